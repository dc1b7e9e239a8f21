"""Dense transfer pieces: the simple-pyramid backbone, the segmenter's loss and metrics, the poly
schedule, the synthetic scenes, the joint augmentation and the segmentation input sources.

Independent references: torch's cross_entropy(ignore_index), brute-force NumPy IoU, mmcv's
poly + linear-warmup formula written out, files written with PIL.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from flax import traverse_util
from PIL import Image

from mae_jax.data import scenes
from mae_jax.data import segmentation as seg_data
from mae_jax.jobs import optim
from mae_jax.jobs import segmentation as seg_job
from mae_jax.model import backbone as backbone_lib
from mae_jax.model import classifier as classifier_lib
from mae_jax.model import presets
from mae_jax.model import segmenter as segmenter_lib
from mae_jax.model.pos_embed import sincos_2d
from mae_jax.model.vit import Encoder

TINY = dict(embed_dim=32, depth=1, num_heads=2)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(dict(tree)), sep='/')


# --- Backbone --------------------------------------------------------------------------------

@pytest.mark.parametrize('img_size,patch', [(32, 4), (64, 8), ((32, 48), 8), (64, 16),
                                            ((48, 96), 16)])
def test_pyramid_shapes_and_strides(img_size, patch):
  model = backbone_lib.ViTBackbone(img_size=img_size, patch_size=patch, out_channels=24, **TINY)
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((2, h, w, 3)))[0])
  assert list(out) == ['p2', 'p3', 'p4', 'p5'] == list(model.level_names)
  for name, stride in zip(out, (4, 8, 16, 32)):
    assert out[name].shape == (2, h // stride, w // stride, 24), (name, out[name].shape)


def test_pyramid_levels_sit_under_their_patch():
  """One non-zero cell of the stride-16 map reaches exactly the pixels below it on every
  level: 4x up -> rows 4i..4i+3, widened by 1 by the 3x3 conv; pooled 2x -> row i // 2 +- 1."""
  pyramid = backbone_lib.SimpleFeaturePyramid(patch_size=16, out_channels=8)
  grid = np.zeros((1, 8, 8, 16), np.float32)
  i, j = 5, 2
  grid[0, i, j] = np.random.RandomState(0).randn(16)
  out, _ = jax.jit(lambda g: pyramid.init_with_output(jax.random.PRNGKey(1), g))(grid)
  for name, scale in (('p2', 4), ('p3', 2), ('p4', 1)):
    rows, cols = np.nonzero(np.abs(np.asarray(out[name][0])).sum(-1) > 1e-6)
    size = out[name].shape[1]
    assert (rows.min(), rows.max()) == (max(scale * i - 1, 0), min(scale * (i + 1), size - 1))
    assert (cols.min(), cols.max()) == (max(scale * j - 1, 0), min(scale * (j + 1), size - 1))
  rows, cols = np.nonzero(np.abs(np.asarray(out['p5'][0])).sum(-1) > 1e-6)
  assert (rows.min(), rows.max()) == (i // 2 - 1, i // 2 + 1)
  assert (cols.min(), cols.max()) == (j // 2 - 1, j // 2 + 1)


def test_backbone_runs_the_mae_encoder():
  """At the pretraining size, the stride-p level is the pyramid on the MAE encoder's last
  block (no final norm, cls dropped), with the pretraining params."""
  enc = Encoder(img_size=32, patch_size=8, **TINY)
  images = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
  model = backbone_lib.ViTBackbone(img_size=32, patch_size=8, out_channels=8, strides=(8,),
                                   **TINY)
  pyramid = backbone_lib.SimpleFeaturePyramid(8, 8, (8,))
  # Random values in the params' shapes (initialising costs a compilation each).
  rs = np.random.RandomState(3)
  randomize = lambda tree: jax.tree.map(
      lambda x: (0.3 * rs.randn(*x.shape)).astype(x.dtype), tree)
  mae_params = randomize(jax.eval_shape(enc.init, jax.random.PRNGKey(3), images)['params'])
  params = randomize(jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params'])
  assert 'norm' not in params['encoder']
  params = classifier_lib.load_pretrained_encoder(params, {'encoder': mae_params}, None, (4, 4),
                                                  8)

  def both(params, mae_params, images):
    tokens = enc.apply({'params': mae_params}, images, final_norm=False)
    grid = tokens[:, 1:].reshape(2, 4, 4, 32)
    expected = pyramid.apply({'params': params['pyramid']}, grid)['p3']
    return model.apply({'params': params}, images)['p3'], expected

  got, expected = jax.jit(both)(params, mae_params, images)
  assert np.abs(np.asarray(expected)).mean() > 0.1
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_strides_name_the_stride():
  with pytest.raises(ValueError, match=r'stride 4 is not patch_size \(14\).*\[7, 14, 28, 56\]'):
    backbone_lib.backbone_from_config(presets.model_config('vit_h'))
  with pytest.raises(ValueError, match='ascending'):
    backbone_lib.pyramid_plan(16, (16, 8))


def test_segmenter_loads_encoder_at_a_new_resolution():
  cfg = presets.model_config('tiny')
  enc = Encoder(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
  mae = jax.device_get(jax.jit(enc.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3))))
  model = segmenter_lib.segmenter_from_config(dict(cfg, img_size=48), 5, out_channels=16,
                                              head_channels=16)
  abstract = jax.eval_shape(seg_job.init_params, model, jax.random.PRNGKey(0))
  assert set(abstract) == {'encoder', 'pyramid', 'head'}
  loaded = classifier_lib.load_pretrained_encoder(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), {'encoder': mae['params']},
      dict(cfg), model.grid, model.patch_size)
  got, src = flat(loaded['encoder']), flat(mae['params'])
  for key, value in got.items():
    if key != 'pos_embed':
      np.testing.assert_array_equal(value, src[key], err_msg=key)
  np.testing.assert_allclose(got['pos_embed'], classifier_lib.interpolate_pos_embed(
      sincos_2d(64, 8, cls_token=True)[None], (12, 12)), atol=1e-6)


# --- Loss and metrics ------------------------------------------------------------------------

def test_pixel_loss_matches_torch_and_ignores_the_ignore_label():
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 6, 7, 5).astype(np.float32)
  labels = rs.randint(0, 5, (3, 6, 7))
  labels[rs.rand(3, 6, 7) < 0.3] = 255
  sums = jax.jit(segmenter_lib.pixel_losses)(logits, labels)
  ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                                          torch.from_numpy(labels), ignore_index=255)
  assert sums['count'] == (labels != 255).sum()
  np.testing.assert_allclose(sums['loss_sum'] / sums['count'], ref.item(), rtol=1e-5)
  # Ignored pixels get no gradient, whatever their logits.
  grad = jax.grad(lambda x: segmenter_lib.pixel_losses(x, labels)['loss_sum'])(logits)
  assert np.all(np.asarray(grad)[labels == 255] == 0)
  assert np.all(np.abs(np.asarray(grad)[labels != 255]).sum(-1) > 0)


def _brute_force_metrics(preds, labels, k, ignore=255):
  keep = labels != ignore
  ious, accs = [], []
  for c in range(k):
    inter = np.sum((preds == c) & (labels == c) & keep)
    union = np.sum(((preds == c) | (labels == c)) & keep)
    if union:
      ious.append(inter / union)
    if np.sum((labels == c) & keep):
      accs.append(inter / np.sum((labels == c) & keep))
  return (100 * np.mean(ious), 100 * np.sum((preds == labels) & keep) / keep.sum(),
          100 * np.mean(accs))


def test_miou_matches_brute_force_numpy():
  rs = np.random.RandomState(0)
  k = 7
  labels = rs.randint(0, k, (6, 9, 11))
  labels[labels == 3] = 4  # class 3 never labelled: only its false positives count
  labels[rs.rand(*labels.shape) < 0.2] = 255
  preds = np.where(rs.rand(*labels.shape) < 0.6, labels, rs.randint(0, k, labels.shape))
  preds[preds == 6] = 5  # class 6 never predicted
  preds = np.where(preds == 255, 0, preds)
  labels[labels == 6] = 255  # and never labelled either: absent, left out of the mean
  confusion = sum(np.asarray(jax.jit(segmenter_lib.confusion_matrix, static_argnums=2)(
      preds[i:i + 2], labels[i:i + 2], k)) for i in range(0, 6, 2))  # accumulated over batches
  got = seg_job.metrics_from_confusion(confusion)
  miou, acc, macc = _brute_force_metrics(preds, labels, k)
  assert got['miou'] == pytest.approx(miou, rel=1e-12)
  assert got['pixel_accuracy'] == pytest.approx(acc, rel=1e-12)
  assert got['mean_accuracy'] == pytest.approx(macc, rel=1e-12)
  assert got['iou_per_class'][6] is None and got['iou_per_class'][3] == 0.0
  # Padding examples (valid False) are not counted.
  valid = np.array([True, False])
  cm = segmenter_lib.confusion_matrix(preds[:2], labels[:2], k, valid=valid)
  np.testing.assert_array_equal(cm, segmenter_lib.confusion_matrix(preds[:1], labels[:1], k))


def test_poly_schedule_is_mmcv_poly_with_linear_warmup():
  base, warmup, total, ratio = 3e-4, 15, 100, 1e-6
  schedule = optim.warmup_poly_schedule(base, warmup, total, 1.0, 0.0, ratio)
  for it in range(total + 1):
    regular = (base - 0.0) * (1 - it / total) ** 1.0 + 0.0  # PolyLrUpdaterHook.get_lr
    if it < warmup:  # LinearWarmup in before_train_iter
      regular = regular * (1 - (1 - it / warmup) * (1 - ratio))
    assert float(schedule(it)) == pytest.approx(regular, rel=1e-5, abs=1e-12), it


# --- Synthetic scenes ------------------------------------------------------------------------

def test_scenes_are_deterministic_and_cover_every_class():
  images, masks = scenes.generate('train', 24, 32)
  again, _ = scenes.generate('test', 3, 32)
  image, mask = scenes.scene(5, 'train', 32)
  np.testing.assert_array_equal(images[5], image)  # scene i does not depend on the count
  np.testing.assert_array_equal(masks[5], mask)
  assert not np.array_equal(again[0], images[0])  # splits differ
  assert images.shape == (24, 32, 32, 3) and masks.dtype == np.uint8
  assert set(np.unique(masks)) == set(range(scenes.NUM_CLASSES))
  # Shapes are textured like the background: the class is not readable off the colour.
  for k in range(1, scenes.NUM_CLASSES):
    means = [images[i][masks[i] == k].mean(0) for i in range(24) if (masks[i] == k).any()]
    assert np.std(means, axis=0).min() > 20


# --- Augmentation and the input pipeline -----------------------------------------------------

def _painted_pair(h, w, seed=0):
  """A mask of large rectangles and the image painted with each class's colour."""
  rs = np.random.RandomState(seed)
  mask = np.zeros((h, w), np.int32)
  for k in range(1, 6):
    y, x = rs.randint(0, h - 8), rs.randint(0, w - 8)
    mask[y:y + rs.randint(8, h // 2), x:x + rs.randint(8, w // 2)] = k
  return scenes.PALETTE[mask].astype(np.uint8), mask


def test_augmentation_keeps_image_and_mask_aligned():
  """Draw the mask onto the image, augment both, and read the mask back off the image: every
  pixel away from a class boundary has exactly its class's colour; padding is ignored."""
  image, mask = _painted_pair(40, 72)
  cfg = seg_data.resolve_config({})
  augment = tf.function(lambda im, m, seed: seg_data.augment_pair(im, m, seed, 32, cfg))
  sizes, flips = set(), 0
  for s in range(24):
    out_image, out_mask = augment(tf.constant(image), tf.constant(mask),
                                  tf.constant([7, s], tf.int64))
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert out_image.shape[:2] == out_mask.shape
    sizes.add(out_mask.shape)
    padded = np.zeros((34, 34), np.int32) - 1
    padded[1:1 + out_mask.shape[0], 1:1 + out_mask.shape[1]] = out_mask
    windows = np.stack([padded[dy:dy + out_mask.shape[0], dx:dx + out_mask.shape[1]]
                        for dy in range(3) for dx in range(3)])
    interior = (windows == out_mask).all(0)
    assert interior.mean() > 0.25  # the crop border is never interior
    np.testing.assert_allclose(out_image[interior], scenes.PALETTE[out_mask[interior]], atol=0.5)
    flips += int(out_image[0, 0].tolist() != out_image[0, -1].tolist())
  assert len(sizes) > 1  # random scales: some crops are smaller than 32 and get padded later
  assert flips > 0


def _batches(cfg, n, **kw):
  it = seg_data.create_dataset(cfg, **{'split': 'train', 'mode': 'train', 'global_batch_size': 4,
                                       'image_size': 32, 'seed': 0, 'process_index': 0,
                                       'process_count': 1, **kw})
  return [next(it) for _ in range(n)]


def test_stream_resumes_and_splits_over_hosts():
  cfg = seg_data.resolve_config(dict(scenes_train=10, scenes_eval=6))
  run = _batches(cfg, 4)
  for b in run:
    assert b['image'].shape == (4, 32, 32, 3) and b['mask'].shape == (4, 32, 32)
    assert set(np.unique(b['mask'])) <= set(range(6)) | {255}
  resumed = _batches(cfg, 1, start_step=3)[0]
  host1 = _batches(cfg, 1, start_step=3, process_index=1, process_count=2)[0]
  for key in ('image', 'mask', 'index'):
    np.testing.assert_array_equal(resumed[key], run[3][key])
    np.testing.assert_array_equal(host1[key], run[3][key][2:])
  evals = _batches(cfg, 2, split='test', mode='eval')
  assert evals[-1]['valid'].tolist() == [True, True, False, False]
  assert (evals[-1]['mask'][2:] == 255).all()
  _, masks = scenes.generate('test', 6, 32)
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in evals])[:6], masks)


def write_folder(root, split, pairs):
  """pairs: name -> (image uint8 HxWx3, mask uint8 HxW or None for no mask file)."""
  for sub in ('images', 'annotations'):
    os.makedirs(os.path.join(root, sub, split), exist_ok=True)
  for name, (image, mask) in pairs.items():
    Image.fromarray(image).save(os.path.join(root, 'images', split, name + '.png'))
    if mask is not None:
      Image.fromarray(mask).save(os.path.join(root, 'annotations', split, name + '.png'))


def test_folder_source_reads_masks_and_reduces_zero_label(tmp_path):
  images, masks = scenes.generate('train', 3, 32)
  write_folder(str(tmp_path), 'val', {f'x{i}': (images[i], masks[i]) for i in range(3)})
  cfg = dict(source='folder', data_dir=str(tmp_path), train_split='val', eval_split='val')
  seg_data.verify_split(cfg, 'val', 6, 32)
  batch = _batches(cfg, 1, split='val', mode='eval')[0]
  np.testing.assert_array_equal(batch['mask'][:3], masks)
  reduced = _batches(dict(cfg, reduce_zero_label=True), 1, split='val', mode='eval')[0]
  np.testing.assert_array_equal(reduced['mask'][:3], np.where(masks == 0, 255, masks.astype(int) - 1))


def test_bad_masks_are_named(tmp_path):
  image, mask = scenes.scene(0, 'train', 32)
  out_of_range = mask.copy()
  out_of_range[3, 4] = 9
  cases = {
      'missing': ({'a': (image, mask), 'b': (image, None)}, FileNotFoundError,
                  r"mask of image '.*b\.png' is missing: expected '.*annotations/train/b\.png'"),
      'size': ({'a': (image, mask[:, :30])}, ValueError,
               r"Mask size \(32, 30\) differs from its image size \(32, 32\): image '.*a\.png'"),
      'range': ({'a': (image, out_of_range)}, ValueError,
                r"Class id 9 is outside \[0, 6\) .*annotations/train/a\.png"),
      'rgb': ({'a': (image, image)}, ValueError, r'has 3 channels'),
  }
  for name, (pairs, error, message) in cases.items():
    root = str(tmp_path / name)
    write_folder(root, 'train', pairs)
    with pytest.raises(error, match=message):
      seg_data.verify_split(dict(source='folder', data_dir=root), 'train', 6, 32)


def test_tfds_scene_parse150_features_and_reading():
  """Offline: scene_parse150's builder declares `image` (JPEG) and `annotation` (PNG, 3
  channels) Image features; mocked records of that spec are read with mask_channel=0 (the
  instance PNG's red channel = category) and reduce_zero_label, in file order and by random
  access."""
  import tensorflow_datasets as tfds
  builder = tfds.builder('scene_parse150')
  features = builder.info.features
  assert isinstance(features['image'], tfds.features.Image)
  assert isinstance(features['annotation'], tfds.features.Image)
  assert features['annotation'].shape == (None, None, 3)
  assert features['annotation']._encoding_format == 'png'  # pylint: disable=protected-access
  images, masks = scenes.generate('train', 4, 32)
  annotations = np.stack([masks, np.ones_like(masks) * 7, np.zeros_like(masks)], -1)
  encode = lambda x: tf.io.encode_png(tf.constant(x)).numpy()

  def as_dataset(self, split, decoders=None, **kwargs):
    del self, split, decoders, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': [encode(x) for x in images], 'annotation': [encode(x) for x in annotations]})

  def as_data_source(self, split, decoders=None, **kwargs):
    del self, split, decoders, kwargs
    return [{'image': encode(x), 'annotation': encode(a)} for x, a in zip(images, annotations)]

  expected = np.where(masks == 0, 255, masks.astype(int) - 1)
  with tfds.testing.mock_data(num_examples=4, as_dataset_fn=as_dataset,
                              as_data_source_fn=as_data_source):
    for read in ('sequential', 'random_access'):
      cfg = dict(source='tfds', name='scene_parse150', mask_channel=0, reduce_zero_label=True,
                 tfds_read=read)
      seg_data.verify_split(cfg, 'test', 6, 32)
      batch = _batches(cfg, 1, split='test', mode='eval')[0]
      np.testing.assert_array_equal(batch['mask'], expected, err_msg=read)
