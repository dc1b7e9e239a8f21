"""Input pipeline: sources, determinism, host slicing, resumption, transforms and errors."""
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import pipeline as ip
from mae_jax.data import preprocess
from mae_jax.data import sources

MEAN = np.array(preprocess.IMAGENET_MEAN, np.float32)
STD = np.array(preprocess.IMAGENET_STD, np.float32)
CLASSES = ('cat', 'ant', 'bee')  # written unsorted: labels must follow the sorted order


def _batches(cfg, n=None, **kwargs):
  kwargs = {'split': 'train', 'mode': 'pretrain', 'global_batch_size': 8, 'image_size': 16,
            'seed': 0, 'process_index': 0, 'process_count': 1, **kwargs}
  it = ip.create_dataset(cfg, **kwargs)
  return list(it) if n is None else [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _smooth_image(rng, h, w):
  """A smooth random colour field (so that resizing is not trivial)."""
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/{train,val}/{cat,ant,bee}/: PNGs and JPEGs of assorted sizes; returns (root, files)."""
  root = tmp_path_factory.mktemp('imagefolder')
  rng = np.random.default_rng(0)
  files = {}
  for split, per_class in (('train', 4), ('val', 3)):
    for c in CLASSES:
      os.makedirs(root / split / c)
      for i in range(per_class):
        ext = ('png', 'jpg', 'JPEG')[i % 3]
        path = root / split / c / f'{i}.{ext}'
        Image.fromarray(_smooth_image(rng, 20 + 3 * i, 30 - 2 * i)).save(
            path, 'PNG' if ext == 'png' else 'JPEG', quality=95)
        files.setdefault(split, []).append((str(path), sorted(CLASSES).index(c)))
  (root / 'train' / 'ant' / 'notes.txt').write_text('not an image: ignored')
  return str(root), {s: sorted(v) for s, v in files.items()}


def _folder_cfg(root, **overrides):
  return ml_cfg(source='imagefolder', data_dir=root, train_split='train', eval_split='val',
                **overrides)


def ml_cfg(**fields):
  cfg = ip.default_dataset_config()
  cfg.update(fields)
  return cfg


# ----------------------------------------------------------------------------- sources
def test_imagefolder_eval_reads_every_file_with_labels_and_matches_pil(folder):
  """Eval mode = torchvision Resize(int(S/0.875), bicubic) + CenterCrop(S) on PIL images."""
  root, files = folder
  cfg = _folder_cfg(root)
  assert ip.num_classes(cfg) == 3
  assert ip.num_examples(cfg, 'val') == len(files['val']) == 9
  size = 14
  batches = _batches(cfg, split='val', mode='eval', global_batch_size=4, image_size=size)
  assert len(batches) == 3  # ceil(9 / 4)
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), np.arange(12))
  np.testing.assert_array_equal(valid, np.arange(12) < 9)
  np.testing.assert_array_equal(labels[:9], [label for _, label in files['val']])
  np.testing.assert_array_equal(labels[9:], -1)
  np.testing.assert_array_equal(images[9:], np.broadcast_to(-MEAN / STD, images[9:].shape))
  resize_to = int(size / 0.875)
  for (path, _), got in zip(files['val'], images[:9]):
    pil = Image.open(path).convert('RGB')
    w, h = pil.size
    new = (resize_to, int(resize_to * h / w)) if w <= h else (int(resize_to * w / h), resize_to)
    pil = pil.resize(new, Image.BICUBIC)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    want = np.asarray(pil)[top:top + size, left:left + size] / 255.0
    np.testing.assert_allclose(got * STD + MEAN, want, atol=1.01 / 255)


def test_imagefolder_pretrain_labels_follow_files(folder):
  root, files = folder
  cfg = _folder_cfg(root)
  [batch] = _batches(cfg, n=1, global_batch_size=12)
  # One epoch = one batch of 12: a permutation of the 12 training files.
  assert sorted(batch['label'].tolist()) == sorted(label for _, label in files['train'])
  assert batch['image'].shape == (12, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['index'].dtype == np.int64


def test_embedded_photos_are_real_images():
  cfg = ip.default_dataset_config()
  assert ip.num_classes(cfg) == len(sources.EMBEDDED_PHOTOS) >= 8
  assert ip.num_examples(cfg, 'train') == ip.num_classes(cfg)
  [batch] = _batches(cfg, n=1, global_batch_size=16, image_size=32)
  x = batch['image'] * STD + MEAN
  assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
  # Photos: neighbouring pixels correlate strongly (white noise would give ~0).
  corr = np.corrcoef(x[:, :, 1:].ravel(), x[:, :, :-1].ravel())[0, 1]
  assert corr > 0.8, corr
  # Different photos look different: per-label mean colours are far apart.
  means = {int(l): x[batch['label'] == l].mean((0, 1, 2)) for l in np.unique(batch['label'])}
  assert len(means) >= 5
  colours = np.stack(list(means.values()))
  dists = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
  assert np.sort(dists, axis=1)[:, 1].min() > 0.01


def test_tfds_mock_data_sequential_and_random_access():
  kw = dict(global_batch_size=4, image_size=8)
  with tfds.testing.mock_data(num_examples=10):
    seq_cfg = ml_cfg(source='tfds', name='cifar10', tfds_read='auto')  # mocks are TFRecord
    ra_cfg = ml_cfg(source='tfds', name='cifar10', tfds_read='random_access')
    assert ip.num_classes(seq_cfg) == 10
    assert ip.num_examples(seq_cfg, 'train') == ip.num_examples(ra_cfg, 'train') == 10
    runs = []
    for cfg, steps in ((seq_cfg, 4), (ra_cfg, 2)):
      run = _batches(cfg, n=steps, **kw)
      runs.append(run)
      for b in run:
        assert b['image'].shape == (4, 8, 8, 3) and np.isfinite(b['image']).all()
        assert ((b['label'] >= 0) & (b['label'] < 10)).all()
      np.testing.assert_array_equal(np.concatenate([b['index'] for b in run]),
                                    np.arange(4 * steps))
      _assert_same(_batches(cfg, n=1, start_step=steps - 1, **kw)[0], run[-1])
    # Sequential reading: host 1 of 2 gets the second half of each batch.
    seq_run = runs[0]
    host1 = _batches(seq_cfg, n=2, process_index=1, process_count=2, start_step=2, **kw)
    for got, want in zip(host1, seq_run[2:4]):
      _assert_same(got, {k: v[2:] for k, v in want.items()})
    evals = _batches(seq_cfg, split='test', mode='eval', **kw)
    assert len(evals) == 3 and evals[-1]['valid'].tolist() == [True, True, False, False]
    images = np.concatenate([b['image'] for b in evals])[:10]
    assert len({im.tobytes() for im in images}) == 10  # one pass, every example once


# ----------------------------------------------------------------------------- chosen examples
def _eval_pass(cfg, split, image_size):
  batches = _batches(cfg, split=split, mode='eval', image_size=image_size, global_batch_size=8)
  return {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label', 'index')}


def test_load_examples_equal_the_eval_stream_at_those_indices(folder):
  root, _ = folder
  for cfg, split in ((_folder_cfg(root), 'val'), (ip.default_dataset_config(), 'test')):
    full = _eval_pass(cfg, split, 16)
    indices = [5, 0, 7, 2]  # any order; the result follows it
    got = ip.load_examples(cfg, split=split, indices=indices, image_size=16)
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(got[key], full[key][indices], err_msg=key)
  with pytest.raises(ValueError, match=r'must be in \[0, 9\)'):
    ip.load_examples(_folder_cfg(root), split='val', indices=[9], image_size=16)


def test_spread_mixes_the_classes_of_a_sorted_folder_and_is_fixed_by_the_seed(tmp_path):
  rng = np.random.default_rng(3)
  for c in range(4):
    class_dir = tmp_path / 'train' / f'class{c}'
    os.makedirs(class_dir)
    for i in range(6):
      Image.fromarray(_smooth_image(rng, 12, 12)).save(class_dir / f'{i}.png')
  cfg = ml_cfg(source='imagefolder', data_dir=str(tmp_path), train_split='train')
  picks = ip.spread_examples(cfg, split='train', count=4, image_size=8, seed=0)
  assert picks['label'].tolist() == [0, 1, 2, 3]  # the first 4 would all be class 0
  again = ip.spread_examples(cfg, split='train', count=4, image_size=8, seed=0)
  _assert_same(picks, again)  # a rerun or a resume shows the same images
  # Another seed, other images; on CIFAR-10's test split (10 classes of 1,000, sorted), 8
  # images from 8 classes whatever the seed.
  assert len({tuple(ip.spread_indices(10_000, 8, seed)) for seed in range(5)}) == 5
  for seed in range(20):
    assert len(set(ip.spread_indices(10_000, 8, seed) // 1000)) == 8
  assert ip.spread_examples(cfg, split='train', count=99, image_size=8, seed=0)['index'].tolist() \
      == list(range(24))  # more than the split: all of it, once
  # Only the chosen images are read: every other file may be unreadable.
  chosen = {int(i) for i in picks['index']}
  files = sorted(str(p) for p in (tmp_path / 'train').rglob('*.png'))
  for i, path in enumerate(files):
    if i not in chosen:
      with open(path, 'wb') as f:
        f.write(b'not an image')
  _assert_same(ip.spread_examples(cfg, split='train', count=4, image_size=8, seed=0), picks)
  with open(files[min(chosen)], 'wb') as f:
    f.write(b'not an image either')
  with pytest.raises(ValueError, match=f"Cannot read image file '{files[min(chosen)]}'"):
    ip.spread_examples(cfg, split='train', count=4, image_size=8, seed=0)


def test_spread_reads_only_the_first_records_of_a_sequential_source(monkeypatch):
  monkeypatch.setattr(ip, 'SEQUENTIAL_SPREAD', 4)
  with tfds.testing.mock_data(num_examples=10):
    seq_cfg = ml_cfg(source='tfds', name='cifar10', tfds_read='auto')  # mocks are TFRecord
    ra_cfg = ml_cfg(source='tfds', name='cifar10', tfds_read='random_access')
    seq = ip.spread_examples(seq_cfg, split='test', count=2, image_size=8, seed=0)
    ra = ip.spread_examples(ra_cfg, split='test', count=2, image_size=8, seed=0)
    assert seq['index'].max() < 4 <= ra['index'].max()  # random access: all 10
    full = _eval_pass(seq_cfg, 'test', 8)
    np.testing.assert_array_equal(seq['image'], full['image'][seq['index']])
    got = ip.load_examples(seq_cfg, split='test', indices=[9, 3], image_size=8)
    np.testing.assert_array_equal(got['image'], full['image'][[9, 3]])


# ----------------------------------------------------------------------------- the stream
@pytest.fixture(scope='module')
def embedded_run():
  return _batches(ip.default_dataset_config(), n=4, global_batch_size=6)


def test_same_seed_same_batches_other_seed_differs(embedded_run):
  cfg = ip.default_dataset_config()
  again = _batches(cfg, n=2, global_batch_size=6)
  for a, b in zip(again, embedded_run):
    _assert_same(a, b)
  other = _batches(cfg, n=1, global_batch_size=6, seed=1)[0]
  assert not np.array_equal(other['image'], embedded_run[0]['image'])
  # Each epoch (8 positions) is a permutation of the 8 photos, a different one each epoch.
  labels = np.concatenate([b['label'] for b in embedded_run])
  assert sorted(labels[:8].tolist()) == sorted(labels[8:16].tolist()) == list(range(8))
  assert labels[:8].tolist() != labels[8:16].tolist()


def test_start_step_resumes_exactly(embedded_run):
  resumed = _batches(ip.default_dataset_config(), n=2, global_batch_size=6, start_step=2)
  _assert_same(resumed[0], embedded_run[2])
  _assert_same(resumed[1], embedded_run[3])


def test_hosts_concatenate_to_the_single_host_batch(embedded_run):
  cfg = ip.default_dataset_config()
  hosts = [_batches(cfg, n=2, global_batch_size=6, process_index=h, process_count=3,
                    start_step=1) for h in range(3)]
  for step in range(2):
    assert hosts[0][step]['image'].shape[0] == 2
    merged = {k: np.concatenate([h[step][k] for h in hosts]) for k in hosts[0][step]}
    _assert_same(merged, embedded_run[1 + step])


def test_eval_pads_last_batch_and_marks_valid():
  cfg = ip.default_dataset_config()
  n = ip.num_examples(cfg, 'test')
  assert n == len(sources.EMBEDDED_PHOTOS) * cfg.embedded_eval_grid ** 2
  batches = _batches(cfg, split='test', mode='eval', global_batch_size=32, image_size=8)
  assert len(batches) == -(-n // 32)
  valid = np.concatenate([b['valid'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert valid.sum() == n and valid[:n].all()
  np.testing.assert_array_equal(labels[:n], np.repeat(np.arange(8), cfg.embedded_eval_grid ** 2))
  # Two hosts: same number of batches each, together the same stream.
  hosts = [_batches(cfg, split='test', mode='eval', global_batch_size=32, image_size=8,
                    process_index=h, process_count=2) for h in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(batches)
  np.testing.assert_array_equal(
      np.concatenate([np.concatenate([hosts[0][s]['valid'], hosts[1][s]['valid']])
                      for s in range(len(batches))]), valid)


def test_pretrain_normalises_a_solid_image_exactly(tmp_path):
  colour = np.array([200, 30, 90], np.uint8)
  os.makedirs(tmp_path / 'train' / 'x')
  Image.fromarray(np.broadcast_to(colour, (40, 50, 3)).copy()).save(tmp_path / 'train/x/a.png')
  [batch] = _batches(_folder_cfg(str(tmp_path)), n=1, global_batch_size=2, image_size=8)
  np.testing.assert_allclose(batch['image'], np.broadcast_to((colour / 255 - MEAN) / STD,
                                                             (2, 8, 8, 3)), atol=1e-5)


def test_normalize_and_flip_give_the_numpy_values_on_static_and_dynamic_shapes():
  """The row-tiled normalisation and tf.reverse flip are exact, whatever is known of the shape."""
  rng = np.random.RandomState(0)
  want = lambda x: (x.astype(np.float32) - MEAN * np.float32(255)) * (
      np.float32(1) / (STD * np.float32(255)))
  for shape in [(3, 5, 7, 3), (5, 7, 3), (2, 2, 5, 7, 3)]:  # batch, image, nested batch
    x = rng.randint(0, 256, shape).astype(np.uint8)
    np.testing.assert_array_equal(preprocess.normalize(x, MEAN, STD).numpy(), want(x))
  dynamic = tf.function(lambda x: preprocess.normalize(x, MEAN, STD),
                        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  x = rng.randint(0, 256, (2, 6, 4, 3)).astype(np.uint8)
  np.testing.assert_array_equal(dynamic(x).numpy(), want(x))
  image = rng.randint(0, 256, (5, 7, 3)).astype(np.uint8)
  seed = tf.constant([0, 1], tf.int64)
  for probability, expected in ((1.0, image[:, ::-1]), (0.0, image)):
    flipped = preprocess.flip_left_right(tf.constant(image), seed, probability)
    np.testing.assert_array_equal(flipped.numpy(), expected)


def test_finetune_mode_applies_randaugment_and_erasing():
  cfg = ip.default_dataset_config()
  probe = _batches(cfg, n=1, mode='linear_probe', global_batch_size=16, image_size=16)[0]
  tuned = _batches(cfg, n=1, mode='finetune', global_batch_size=16, image_size=16)[0]
  assert tuned['image'].shape == probe['image'].shape and tuned['image'].dtype == np.float32
  assert np.isfinite(tuned['image']).all()
  np.testing.assert_array_equal(tuned['label'], probe['label'])
  # Same crops and flips; RandAugment / erasing change some of the images.
  changed = [not np.allclose(a, b, atol=1e-5) for a, b in zip(tuned['image'], probe['image'])]
  assert any(changed)


# ----------------------------------------------------------------------------- transforms
def test_random_resized_crop_box_geometry():
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  for h, w in ((224, 224), (300, 451), (37, 64)):
    for s in range(60):
      top, left, ch, cw = preprocess.random_resized_crop_box(
          h, w, tf.constant([s, 7], tf.int64), scale, ratio).numpy()
      assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
      # Rounding the sides moves area and aspect by at most half a pixel per side.
      assert scale[0] * h * w - (ch + cw) <= ch * cw <= scale[1] * h * w + (ch + cw)
      assert ratio[0] - 1 / ch - 1 / cw < cw / ch < ratio[1] + 1 / ch + 1 / cw + 0.02


def test_random_resized_crop_fallback_is_torchvision_centre_crop():
  # Nothing with aspect <= 4/3 covering >= 20% of a 10x1000 strip fits: torchvision falls
  # back to the centre crop with aspect clamped to 4/3: h = 10, w = round(10 * 4/3) = 13.
  box = preprocess.random_resized_crop_box(10, 1000, tf.constant([0, 1], tf.int64), (0.2, 1.0))
  np.testing.assert_array_equal(box.numpy(), [0, (1000 - 13) // 2, 10, 13])
  box = preprocess.random_resized_crop_box(1000, 10, tf.constant([0, 1], tf.int64), (0.2, 1.0))
  np.testing.assert_array_equal(box.numpy(), [(1000 - 13) // 2, 0, 13, 10])


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_random_resized_crop_matches_pil_crop_and_bicubic_resize(fmt):
  rng = np.random.default_rng(1)
  image = _smooth_image(rng, 90, 120)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, fmt, quality=95)
  data = buf.getvalue()
  decoded = Image.open(io.BytesIO(data)).convert('RGB')
  for s in range(4):
    seed = tf.constant([s, 3], tf.int64)
    top, left, ch, cw = preprocess.random_resized_crop_box(90, 120, seed, (0.08, 1.0)).numpy()
    want = np.asarray(decoded.crop((left, top, left + cw, top + ch)).resize((24, 24),
                                                                           Image.BICUBIC))
    got = preprocess.random_resized_crop(tf.constant(data), seed, 24, (0.08, 1.0)).numpy()
    # PNG: TF's antialiased bicubic vs PIL's, within one grey level. JPEG: decoding only
    # the crop window changes chroma upsampling at its edges by a level or two more.
    tol = 1 if fmt == 'PNG' else 3
    assert np.abs(got.astype(int) - want).max() <= tol


def test_exact_resize_matches_pil_on_noise():
  """Eval's resize rounds between PIL's two passes (a single 2-D pass misses by ~10 here)."""
  rng = np.random.default_rng(3)
  for (h, w), (out_h, out_w) in (((14, 20), (32, 32)), ((61, 45), (24, 30)), ((40, 25), (24, 50)),
                                 ((25, 40), (50, 24)), ((80, 50), (30, 40))):
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(noise).resize((out_w, out_h), Image.BICUBIC)).astype(int)
    got = preprocess.resize_bicubic(tf.constant(noise), out_h, out_w, exact=True).numpy()
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


# ----------------------------------------------------------------------------- bad input
def test_bad_config_errors(folder, tmp_path):
  root, _ = folder
  with pytest.raises(ValueError, match='Unknown dataset source'):
    ip.create_dataset(ml_cfg(source='s3'), split='train', mode='pretrain', global_batch_size=8,
                      image_size=16, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Unknown dataset config field.*'crop_scal'"):
    ip.num_examples({'crop_scal': (0.2, 1.0)}, 'train')
  with pytest.raises(ValueError, match='Unknown mode'):
    _batches(ip.default_dataset_config(), n=1, mode='train')
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    _batches(ip.default_dataset_config(), n=1, global_batch_size=8, process_count=3)
  with pytest.raises(ValueError, match="embedded dataset has splits"):
    ip.num_examples(ip.default_dataset_config(), 'validation')


def test_imagefolder_errors_name_the_path_and_layout(folder, tmp_path):
  root, _ = folder
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=f"{missing}.*expected layout"):
    ip.num_examples(_folder_cfg(missing), 'train')
  with pytest.raises(FileNotFoundError, match="found.*'train'.*'val'"):
    ip.num_examples(_folder_cfg(root), 'validation')
  empty = tmp_path / 'empty'
  os.makedirs(empty / 'train' / 'a')
  with pytest.raises(ValueError, match='holds no images'):
    ip.create_dataset(_folder_cfg(str(empty)), split='train', mode='pretrain',
                      global_batch_size=8, image_size=16, seed=0, process_index=0,
                      process_count=1)
  with pytest.raises(ValueError, match='data_dir is empty'):
    ip.num_examples(_folder_cfg(''), 'train')


def test_unreadable_image_is_named(tmp_path):
  rng = np.random.default_rng(2)
  os.makedirs(tmp_path / 'train' / 'a')
  for i in range(3):
    Image.fromarray(_smooth_image(rng, 20, 20)).save(tmp_path / 'train' / 'a' / f'{i}.jpg')
  bad = tmp_path / 'train' / 'a' / '1.jpg'
  bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG: header fine, data missing
  with pytest.raises(ValueError, match=f"(?s)Cannot read image file '{bad}'.*replace or delete"):
    _batches(_folder_cfg(str(tmp_path)), n=1, global_batch_size=3, image_size=8)


def test_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset'"):
    ip.num_classes(ml_cfg(source='tfds', name='no_such_dataset'))
  with pytest.raises(FileNotFoundError,
                     match=f"(?s)not prepared in data_dir '{tmp_path}'.*tfds build"):
    ip.create_dataset(ml_cfg(source='tfds', name='cifar10', data_dir=str(tmp_path)),
                      split='train', mode='pretrain', global_batch_size=8, image_size=16, seed=0,
                      process_index=0, process_count=1)


# ----------------------------------------------------------------------------- unusual images
def _encoded(image, fmt):
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _unusual_images():
  """{name: (bytes, expected RGB pixels)}: valid files in the modes ImageNet's train set has."""
  rng = np.random.default_rng(7)
  rgb = rng.integers(0, 256, (20, 24, 3), np.uint8)
  grey = rgb[..., 0]
  deep = rng.integers(0, 65536, (20, 24), np.uint16)
  pil = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  cases = {
      'grey.png': _encoded(Image.fromarray(grey), 'PNG'),
      'grey.jpg': _encoded(Image.fromarray(grey), 'JPEG'),
      'rgba.png': _encoded(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), 'PNG'),
      'palette.png': _encoded(Image.fromarray(rgb).convert('P'), 'PNG'),
      'cmyk.jpg': _encoded(Image.fromarray(rgb).convert('CMYK'), 'JPEG'),
      'png_named.jpg': _encoded(Image.fromarray(rgb), 'PNG'),
  }
  expected = {name: pil(data) for name, data in cases.items()}  # PIL's convert('RGB')
  # 16 bit: PIL's convert('RGB') clips at 255; the decoder keeps the high byte instead.
  cases['deep16.png'] = _encoded(Image.fromarray(deep), 'PNG')
  expected['deep16.png'] = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, -1)
  assert Image.open(io.BytesIO(cases['cmyk.jpg'])).mode == 'CMYK'
  assert Image.open(io.BytesIO(cases['png_named.jpg'])).format == 'PNG'
  return {name: (cases[name], expected[name]) for name in cases}


@pytest.mark.parametrize('name', sorted(_unusual_images()))
def test_unusual_valid_images_are_converted_to_rgb(name):
  data, expected = _unusual_images()[name]
  got = preprocess.decode_rgb(tf.constant(data)).numpy()
  np.testing.assert_array_equal(got, expected)
  crop = preprocess.random_resized_crop(tf.constant(data), tf.constant([3, 4], tf.int64), 8,
                                        (0.2, 1.0)).numpy()
  assert crop.shape == (8, 8, 3)


def test_unusual_images_in_a_folder_read_in_error_mode(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  for name, (data, _) in _unusual_images().items():
    (tmp_path / 'train' / 'a' / name).write_bytes(data)
  [batch] = _batches(_folder_cfg(str(tmp_path)), split='train', mode='eval',
                     global_batch_size=8, image_size=8)
  assert batch['valid'][:7].all() and np.isfinite(batch['image']).all()


# ----------------------------------------------------------------------------- bad_images
@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """12 JPEGs in two classes; 1 zero bytes, 1 truncated (its header survives)."""
  root = tmp_path_factory.mktemp('bad')
  rng = np.random.default_rng(3)
  for c in ('a', 'b'):
    os.makedirs(root / 'train' / c)
    for i in range(6):
      Image.fromarray(_smooth_image(rng, 24, 30)).save(root / 'train' / c / f'{i}.jpg')
  (root / 'train' / 'a' / '0.jpg').write_bytes(b'')
  bad = root / 'train' / 'b' / '3.jpg'
  bad.write_bytes(bad.read_bytes()[:200])
  return root


def test_skip_replaces_bad_images_deterministically_and_resumes_exactly(bad_folder, caplog):
  cfg = _folder_cfg(str(bad_folder), bad_images='skip')
  kw = dict(global_batch_size=4, image_size=8)
  stream = ip.create_dataset(cfg, split='train', mode='pretrain', seed=0, process_index=0,
                             process_count=1, **kw)
  batches = [next(stream) for _ in range(9)]  # 3 epochs of 12
  assert 'replaced' not in batches[0]  # the count stays in the iterator, off the device
  # Each epoch meets both bad files once (a replacement may be bad too: >= 6).
  assert stream.bad_images >= 6
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'a/0.jpg' in messages and 'b/3.jpg' in messages and 'Input is empty' in messages
  # Stream positions stay the same: nothing is dropped, only which image fills a slot.
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), np.arange(36))
  assert all(np.isfinite(b['image']).all() for b in batches)
  good = _folder_cfg(str(bad_folder))
  again = _batches(cfg, n=9, **kw)  # replacements depend on the seed and position only
  for a, b in zip(batches, again):
    _assert_same(a, b)
  for start in (2, 5):  # resumed (also inside the robust part): the same batches
    resumed = _batches(cfg, n=9 - start, start_step=start, **kw)
    for a, b in zip(batches[start:], resumed):
      _assert_same(a, b)
  with pytest.raises(ValueError, match='Cannot read image file'):
    _batches(good, n=9, **kw)  # the default: an error naming the file


def test_skip_drops_bad_images_from_evaluation(bad_folder):
  cfg = _folder_cfg(str(bad_folder), bad_images='skip')
  stream = ip.create_dataset(cfg, split='train', mode='eval', global_batch_size=5, image_size=8,
                             seed=0, process_index=0, process_count=1)
  batches = list(stream)
  valid = np.concatenate([b['valid'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert valid.sum() == 10 and stream.bad_images == 2
  files = ip.sources._image_folder_split(str(bad_folder), 'train', 'train')[1]
  dropped = [f for f, v in zip(files, valid) if not v]
  assert [os.path.basename(os.path.dirname(f)) + '/' + os.path.basename(f)
          for f in dropped] == ['a/0.jpg', 'b/3.jpg']
  assert (labels[~valid] == -1).all()


def test_skip_stops_when_the_data_is_broken_and_needs_random_access(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  for i in range(4):
    (tmp_path / 'train' / 'a' / f'{i}.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match=r'8 examples in a row are unreadable.*data looks broken'):
    _batches(_folder_cfg(str(tmp_path), bad_images='skip'), n=1, global_batch_size=2)
  with pytest.raises(ValueError, match='Unknown bad_images'):
    _batches(_folder_cfg(str(tmp_path), bad_images='ignore'), n=1)
  with tfds.testing.mock_data(num_examples=10):
    with pytest.raises(ValueError, match="bad_images='skip' needs random access.*array_record"):
      _batches(ml_cfg(source='tfds', name='cifar10', tfds_read='sequential', bad_images='skip'),
               n=1)


@pytest.mark.parametrize('mode', ['pretrain', 'finetune', 'eval'])
def test_robust_reading_gives_the_plain_pipelines_batches_on_good_files(folder, mode):
  """bad_images='skip' reads the examples found unreadable through their candidates: on
  readable files that must give the very batches of the plain pipeline, or a resumed run,
  which has not met a bad file yet, would differ. Here every example but one is a suspect."""
  root, _ = folder
  stream = ip.create_dataset(_folder_cfg(root, bad_images='skip'), split='train', mode=mode,
                             global_batch_size=5, image_size=8, seed=1, process_index=0,
                             process_count=1)
  plain = list(stream._build(1, frozenset(), 0).take(3).as_numpy_iterator())
  flagged = list(stream._build(1, frozenset(range(1, 12)), 0).take(3).as_numpy_iterator())
  assert len(plain) == len(flagged) == (2 if mode == 'eval' else 3)  # eval: 12 files + padding
  assert 0 < sum(b['suspect'].sum() for b in flagged) < sum(b['suspect'].size for b in flagged)
  for a, b in zip(plain, flagged):
    assert b['suspect'].any()
    assert not np.array_equal(a['image'], b['image'])  # stand-ins in the suspects' slots
    _assert_same(a, stream._complete(b))
  assert stream.bad_images == 0


def test_eval_examples_are_the_eval_stream_at_those_indices():
  """The k-NN monitor's fixed images: the eval crops of the chosen examples, in the order
  asked for, as uint8; normalised, bit-identical to the eval batches."""
  cfg = ip.default_dataset_config()
  full = next(iter(ip.create_dataset(cfg, split='test', mode='eval', global_batch_size=80,
                                           image_size=32, seed=0)))
  indices = ip.spread_indices(72, 10, 0)[::-1]
  got = ip.eval_examples(cfg, split='test', indices=indices, image_size=32)
  assert got['image'].dtype == np.uint8
  np.testing.assert_array_equal(got['index'], indices)
  np.testing.assert_array_equal(got['label'], full['label'][indices])
  np.testing.assert_array_equal(ip.normalize_images(got['image'], cfg),
                                full['image'][indices])
  with pytest.raises(ValueError, match=r'outside \[0, 72\)'):
    ip.eval_examples(cfg, split='test', indices=[72], image_size=32)


def test_eval_examples_of_a_sequential_tfds_split():
  """TFRecord-only TFDS data: records read in order up to the last one wanted, the rest
  skipped undecoded; the same crops as the eval stream, in the order asked for."""
  with tfds.testing.mock_data(num_examples=10):
    cfg = ml_cfg(source='tfds', name='cifar10', tfds_read='auto')
    evals = _batches(cfg, split='test', mode='eval', global_batch_size=16, image_size=8)[0]
    got = ip.eval_examples(cfg, split='test', indices=[7, 2, 5], image_size=8)
  np.testing.assert_array_equal(got['index'], [7, 2, 5])
  np.testing.assert_array_equal(got['label'], evals['label'][[7, 2, 5]])
  np.testing.assert_array_equal(ip.normalize_images(got['image'], cfg), evals['image'][[7, 2, 5]])
