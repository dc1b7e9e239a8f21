"""Fine-tuning augmentations: RandAugment ops against PIL (what timm calls), random erasing
statistics, and Mixup/CutMix invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data import mixup as mixup_lib
from mae_jax.data import randaugment as ra

FILL = (124, 116, 104)


def _test_image(height=23, width=29, seed=0):
  """Smooth gradients plus noise, so interpolation and histograms are non-trivial."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([xx * 7, yy * 9, (xx + yy) * 4], -1) % 256
  return np.clip(base + rng.randint(-40, 40, size=(height, width, 3)), 15, 235).astype(np.uint8)


IMG = _test_image()
PIL_IMG = Image.fromarray(IMG)


def _assert_same(ours, theirs):
  ours = np.asarray(ours)
  theirs = np.asarray(theirs)
  assert ours.dtype == np.uint8 and ours.shape == theirs.shape
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() == 0, f'{(diff > 0).sum()} pixels differ, max {diff.max()}'


def _pil_affine(matrix, img=PIL_IMG):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


# --- RandAugment ops, pixel-exact against PIL --------------------------------------------

@pytest.mark.parametrize('ours,pil', [
    (ra.auto_contrast, ImageOps.autocontrast),
    (ra.equalize, ImageOps.equalize),
    (ra.invert, ImageOps.invert),
])
def test_parameterless_ops_match_pil(ours, pil):
  _assert_same(ours(tf.constant(IMG)), pil(PIL_IMG))


@pytest.mark.parametrize('image', [
    np.full((6, 7, 3), 77, np.uint8),  # flat: left as is
    np.where(np.random.RandomState(1).rand(9, 11, 3) < 0.3, 10, 200).astype(np.uint8),
    np.concatenate([np.random.RandomState(2).randint(0, 50, (4, 20, 3)),
                    np.full((16, 20, 3), 255)]).astype(np.uint8),  # one bin holds most pixels
    np.random.RandomState(3).choice([0, 3, 5, 250], size=(13, 7, 3)).astype(np.uint8),
], ids=['flat', 'two_values', 'heavy_last_bin', 'four_values'])
def test_histogram_ops_match_pil_on_degenerate_images(image):
  _assert_same(ra.equalize(tf.constant(image)), ImageOps.equalize(Image.fromarray(image)))
  _assert_same(ra.auto_contrast(tf.constant(image)), ImageOps.autocontrast(Image.fromarray(image)))


def test_lut_ops_match_pil():
  t = tf.constant(IMG)
  for bits in (1, 2, 3, 4):
    _assert_same(ra.posterize(t, bits), ImageOps.posterize(PIL_IMG, bits))
  assert not np.any(ra.posterize(t, 0).numpy())  # 0 bits: black, as PIL was at release
  for threshold in (0, 26, 128, 256):
    _assert_same(ra.solarize(t, threshold), ImageOps.solarize(PIL_IMG, threshold))
  for add in (0, 44, 99, 110):  # timm's solarize_add: a point LUT below 128
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    _assert_same(ra.solarize_add(t, add), PIL_IMG.point(lut * 3))


@pytest.mark.parametrize('ours,enhancer', [
    (ra.color, ImageEnhance.Color),
    (ra.contrast, ImageEnhance.Contrast),
    (ra.brightness, ImageEnhance.Brightness),
    (ra.sharpness, ImageEnhance.Sharpness),
])
def test_enhance_ops_match_pil(ours, enhancer):
  for factor in (0.1, 0.19, 0.55, 1.0, 1.37, 1.81, 1.9):
    _assert_same(ours(tf.constant(IMG), factor), enhancer(PIL_IMG).enhance(factor))


def test_geometric_ops_match_pil_bicubic_with_fill():
  """MAE passes interpolation='bicubic', which timm hands to the geometric ops."""
  t = tf.constant(IMG)
  h, w = IMG.shape[:2]
  for deg in (-27.0, -3.3, 0.7, 30.0):
    _assert_same(ra.rotate(t, deg, FILL),
                 PIL_IMG.rotate(deg, resample=Image.BICUBIC, fillcolor=FILL))
  for s in (-0.3, -0.11, 0.27):
    _assert_same(ra.shear_x(t, s, FILL), _pil_affine((1, s, 0, 0, 1, 0)))
    _assert_same(ra.shear_y(t, s, FILL), _pil_affine((1, 0, 0, s, 1, 0)))
  for p in (-0.45, 0.05, 0.405):
    _assert_same(ra.translate_x_rel(t, p, FILL), _pil_affine((1, 0, p * w, 0, 1, 0)))
    _assert_same(ra.translate_y_rel(t, p, FILL), _pil_affine((1, 0, 0, 0, 1, p * h)))
  matrix = (0.9, 0.2, 3.1, -0.15, 1.1, -2.0)
  _assert_same(ra.affine_transform(t, matrix, FILL), _pil_affine(matrix))


def test_apply_op_uses_timm_level_mapping():
  """Magnitude 9 -> timm's arguments: rotate 27 deg, shear 0.27, translate 0.405 of the
  size, enhance 1 +/- 0.81, posterize 1 bit, solarize threshold 26, solarize-add 99."""
  t = tf.constant(IMG)
  h, w = IMG.shape[:2]
  enh = {'ColorIncreasing': ImageEnhance.Color, 'ContrastIncreasing': ImageEnhance.Contrast,
         'BrightnessIncreasing': ImageEnhance.Brightness,
         'SharpnessIncreasing': ImageEnhance.Sharpness}
  level = 9 / 10  # timm: (magnitude / _LEVEL_DENOM) * max_value, then a random sign
  for negate, sign in ((False, 1.0), (True, -1.0)):
    shear, pct = sign * (level * 0.3), sign * (level * 0.45)
    expected = {
        'Rotate': PIL_IMG.rotate(sign * (level * 30.0), resample=Image.BICUBIC, fillcolor=FILL),
        'ShearX': _pil_affine((1, shear, 0, 0, 1, 0)),
        'ShearY': _pil_affine((1, 0, 0, shear, 1, 0)),
        'TranslateXRel': _pil_affine((1, 0, pct * w, 0, 1, 0)),
        'TranslateYRel': _pil_affine((1, 0, 0, 0, 1, pct * h)),
        'PosterizeIncreasing': ImageOps.posterize(PIL_IMG, 4 - 3),
        'SolarizeIncreasing': ImageOps.solarize(PIL_IMG, 256 - 230),
        'SolarizeAdd': PIL_IMG.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3),
        'AutoContrast': ImageOps.autocontrast(PIL_IMG),
        'Equalize': ImageOps.equalize(PIL_IMG),
        'Invert': ImageOps.invert(PIL_IMG),
    }
    expected.update({k: e(PIL_IMG).enhance(1.0 + sign * (level * 0.9)) for k, e in enh.items()})
    assert set(expected) == set(ra.OP_NAMES)
    for name in ra.OP_NAMES:
      _assert_same(ra.apply_op(t, name, 9.0, negate, FILL), expected[name])
  # Magnitudes are clipped to [0, 10]: 10 keeps 0 bits, enhance floors at 0.1.
  assert not np.any(ra.apply_op(t, 'PosterizeIncreasing', 12.0).numpy())
  _assert_same(ra.apply_op(t, 'ColorIncreasing', 10.0, True),
               ImageEnhance.Color(PIL_IMG).enhance(0.1))


def test_apply_op_rejects_bad_input():
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    ra.apply_op(tf.constant(IMG), 'Cutout', 5.0)
  with pytest.raises(TypeError, match='uint8'):
    ra.rand_augment(tf.zeros([8, 8, 3]), tf.constant([0, 1]))
  with pytest.raises(TypeError, match='float32'):
    ra.random_erase(tf.zeros([8, 8, 3], tf.uint8), tf.constant([0, 1]))
  with pytest.raises(ValueError, match='one \\[H, W, 3\\] image'):
    ra.rand_augment(tf.zeros([2, 8, 8, 3], tf.uint8), tf.constant([0, 1]))


# --- RandAugment policy, run inside tf.data -----------------------------------------------

SMALL = _test_image(16, 16, seed=5)


def _seed_dataset(fn, num_seeds, image=SMALL):
  """fn(image, seed) in a tf.data map (graph mode) over seeds (i, 17), as one batch."""
  return tf.data.Dataset.range(num_seeds).map(
      lambda i: fn(tf.constant(image), tf.stack([i, tf.constant(17, tf.int64)]))
  ).batch(num_seeds)


def _map_over_seeds(fn, num_seeds, image=SMALL):
  return next(iter(_seed_dataset(fn, num_seeds, image).as_numpy_iterator()))


@pytest.fixture(scope='module')
def rand_augment_runs():
  """240 seeds through rand_augment in tf.data, run twice."""
  ds = _seed_dataset(ra.rand_augment, 240)
  return [next(iter(ds.as_numpy_iterator())) for _ in range(2)]


def test_rand_augment_is_stateless(rand_augment_runs):
  out, again = rand_augment_runs
  np.testing.assert_array_equal(out, again)
  assert out.dtype == np.uint8 and out.shape == (240,) + SMALL.shape
  # ~60 come back unchanged and parameterless ops repeat; the rest differ seed to seed.
  assert len({o.tobytes() for o in out}) > 120


def test_rand_augment_applies_each_op_with_prob_half(rand_augment_runs):
  # Two ops, each skipped with probability 0.5: about a quarter of images come back as is.
  unchanged = sum(np.array_equal(o, SMALL) for o in rand_augment_runs[0])
  assert 35 <= unchanged <= 85, unchanged  # mean 60 (plus rare no-op draws), sd 6.7


def test_rand_augment_draws_every_op_from_timm_table():
  """One op, always applied, fixed magnitude: each output is one of the 15 ops at m=9
  with either sign, and over many seeds every op turns up."""
  candidates = {}
  for name in ra.OP_NAMES:
    for negate in (False, True):
      out = ra.apply_op(tf.constant(SMALL), name, 9.0, negate).numpy()
      candidates.setdefault(out.tobytes(), set()).add(name)
  outs = _map_over_seeds(
      lambda x, s: ra.rand_augment(x, s, num_ops=1, magnitude_std=0.0, op_prob=1.0), 150)
  seen = set()
  for o in outs:
    assert o.tobytes() in candidates
    seen |= candidates[o.tobytes()]
  assert seen == set(ra.OP_NAMES)


# --- random erasing -----------------------------------------------------------------------

def test_random_erase_probability_area_and_noise():
  image = np.full((32, 32, 3), 5.0, np.float32)  # noise never equals 5.0
  ds = _seed_dataset(ra.random_erase, 1200, image)
  outs = next(iter(ds.as_numpy_iterator()))
  masks = np.any(outs != image, axis=-1)
  erased = masks.any(axis=(1, 2))
  assert 240 <= erased.sum() <= 360, erased.sum()  # Binomial(1200, 0.25): mean 300, sd 15
  for m in masks[erased]:
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert m.sum() == h * w  # one solid rectangle
    assert h < 32 and w < 32
    # area = round(sqrt(a r)) * round(sqrt(a / r)) with a in [0.02, 1/3] of 1024 pixels
    assert 0.02 * 1024 * 0.6 <= h * w <= 1024 / 3 * 1.3
    assert 0.3 * 0.6 <= h / w <= 1 / 0.3 / 0.6
  noise = outs[erased][np.broadcast_to(masks[erased][..., None], outs[erased].shape)]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
  np.testing.assert_array_equal(outs, next(iter(ds.as_numpy_iterator())))


def test_random_erase_const_mode_and_bounds():
  image = np.full((16, 16, 3), 5.0, np.float32)
  outs = _map_over_seeds(lambda x, s: ra.random_erase(x, s, probability=1.0, mode='const'),
                         50, image)
  assert np.all((outs == 0.0) | (outs == 5.0))
  assert np.all((outs == 0.0).any(axis=(1, 2, 3)))  # probability 1: always erased
  with pytest.raises(ValueError, match='min_area'):
    ra.random_erase(tf.constant(image), tf.constant([0, 1]), min_area=0.5, max_area=0.2)


# --- Mixup / CutMix -----------------------------------------------------------------------

K = 10
SMOOTH = 0.1
OFF = SMOOTH / K
ON = 1.0 - SMOOTH + OFF
SIZE = 16


def _batch(batch=8):
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, SIZE, SIZE, 3))
  y = jnp.arange(batch) % K  # i and its partner differ (B <= K, or groups of 4 up to 16)
  return x, y


@pytest.fixture(scope='module')
def mix_fn():
  """One compile for all mixup tests: switch_prob is traced (0 = Mixup, 1 = CutMix)."""
  fn = jax.jit(lambda rng, x, y, switch_prob: mixup_lib.mixup_cutmix(
      rng, x, y, K, 0.8, 1.0, switch_prob, SMOOTH))
  return lambda seed, x, y, switch_prob=0.5: fn(jax.random.PRNGKey(seed), x, y, switch_prob)


def _lam_from_targets(targets, y):
  """lam recovered from the target of each example's own class."""
  own = np.asarray(targets)[np.arange(len(y)), np.asarray(y)]
  return (own - OFF) / (ON - OFF)


def _cutmix_box(out, x):
  """Pixels taken from the partner, or None when some pixel is a blend (Mixup)."""
  out, xs = np.asarray(out), np.asarray(x)
  own = np.all(out == xs, axis=-1)
  from_partner = np.all(out == xs[::-1], axis=-1) & ~own
  return from_partner if np.all(own | from_partner) else None


def test_soft_targets_sum_to_one_and_use_timm_smoothing(mix_fn):
  x, y = _batch()
  for seed in range(4):
    _, t = mix_fn(seed, x, y)
    t = np.asarray(t)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
    partner = np.asarray(y)[::-1]
    others = np.ones_like(t, bool)
    others[np.arange(len(y)), np.asarray(y)] = False
    others[np.arange(len(y)), partner] = False
    np.testing.assert_allclose(t[others], OFF, atol=1e-7)
    lam = _lam_from_targets(t, y)
    np.testing.assert_allclose(lam, lam[0], atol=1e-5)  # one lam per batch
    np.testing.assert_allclose(t[np.arange(len(y)), partner], (1 - lam) * ON + lam * OFF,
                               atol=1e-6)


def test_mixup_blends_with_flipped_batch(mix_fn):
  x, y = _batch()
  for seed in range(3):
    out, t = mix_fn(seed, x, y, 0.0)
    lam = _lam_from_targets(t, y)[0]
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-5)


def test_cutmix_box_area_matches_corrected_lam(mix_fn):
  x, y = _batch()
  for seed in range(6):
    out, t = mix_fn(seed, x, y, 1.0)
    from_partner = _cutmix_box(out, x)
    assert from_partner is not None  # every pixel is the example's or its partner's
    np.testing.assert_array_equal(from_partner, from_partner[:1].repeat(len(y), 0))  # one box
    box = from_partner[0]
    if box.any():
      rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
      assert box.sum() == len(rows) * len(cols)  # a rectangle
    lam = _lam_from_targets(t, y)
    np.testing.assert_allclose(lam, 1.0 - box.sum() / box.size, atol=1e-5)


def test_switch_prob_and_lam_distributions(mix_fn):
  x, y = _batch(2)
  cut, lam = [], []
  for seed in range(300):
    out, t = mix_fn(seed, x, y)
    cut.append(_cutmix_box(out, x) is not None)
    lam.append(_lam_from_targets(t, y)[0])
  cut, lam = np.array(cut), np.array(lam)
  assert 0.4 < cut.mean() < 0.6
  assert 0.4 < lam[~cut].mean() < 0.6 and lam[~cut].std() > 0.25  # Beta(0.8, 0.8): sd 0.31
  # Boxes clipped at the border shrink, so the corrected lam sits above Beta(1, 1)'s 0.5:
  # 2e5 draws of timm's rand_bbox + correct_lam on 16x16 give mean 0.722, sd 0.176.
  assert abs(lam[cut].mean() - 0.722) < 0.04 and abs(lam[cut].std() - 0.176) < 0.04


def test_grouped_mixing_is_independent_of_device_count():
  """group_size=4 with global example ids: 4 per-device calls equal one call on all 16."""
  x, y = _batch(16)
  ids = jnp.arange(16) + 1000
  fn = jax.jit(lambda a, b, c: mixup_lib.mixup_cutmix(jax.random.PRNGKey(7), a, b, K,
                                                      group_size=4, example_ids=c))
  whole = fn(x, y, ids)
  parts = [fn(x[i:i + 4], y[i:i + 4], ids[i:i + 4]) for i in range(0, 16, 4)]
  np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole[0], atol=1e-6)
  np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole[1], atol=1e-7)
  lams = [_lam_from_targets(whole[1][i:i + 4], y[i:i + 4])[0] for i in range(0, 16, 4)]
  assert len(set(np.round(lams, 5))) > 1  # groups draw their own lam


def test_mixup_rejects_bad_input():
  x, y = _batch(6)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='even'):
    mixup_lib.mixup_cutmix(rng, x[:5], y[:5], K)
  with pytest.raises(ValueError, match='divide'):
    mixup_lib.mixup_cutmix(rng, x, y, K, group_size=4)
  with pytest.raises(ValueError, match='not one-hot'):
    mixup_lib.mixup_cutmix(rng, x, jax.nn.one_hot(y, K), K)
