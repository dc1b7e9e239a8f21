"""timm's RandAugment ('rand-m9-mstd0.5-inc1') and RandomErasing as TensorFlow ops.

The MAE release fine-tunes with timm's `create_transform(..., auto_augment=
'rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel')`. timm
runs RandAugment on PIL images, so every op here reproduces the PIL function timm calls
(ImageOps, ImageEnhance, Image.transform), pixel for pixel where PIL is deterministic:

- 2 ops per image, drawn uniformly *with replacement* from timm's 15 'increasing' ops;
  each is applied with probability 0.5; its magnitude is drawn per op from
  N(9, 0.5) clipped to [0, 10]; signed ops (rotate, shear, translate, enhance) flip sign
  with probability 0.5.
- Geometric ops use PIL's BICUBIC affine sampling (its a = -1 cubic, edge-clamped taps,
  truncation to uint8), because MAE passes interpolation='bicubic' and timm hands it to
  the ops; pixels mapped from outside the image take the fill colour, timm's `img_mean`
  = round(255 * ImageNet mean) = (124, 116, 104).
- PosterizeIncreasing at magnitude 10 keeps 0 bits (a black image), as PIL did when the
  release was made; current Pillow refuses bits=0.

Randomness comes only from the `seed` tensor (tf.random.stateless_*), so the same seed
gives the same image. Everything is graph-mode TF: use it inside `tf.data.Dataset.map`.
Only the drawn op runs (tf.switch_case). Cost on one CPU core at 224 px: about 3 ms per
image for RandAugment (rotate 11 ms, shear/translate ~2.7 ms, colour ops 0.2-2 ms when
drawn) and 0.5 ms for random erasing; PIL's C code is ~3x cheaper but runs under the GIL.
"""
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

# round(255 * (0.485, 0.456, 0.406)): timm's `img_mean` fill for geometric ops.
IMAGENET_MEAN_UINT8 = (124, 116, 104)
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are in [0, MAX_LEVEL]

# timm's _RAND_INCREASING_TRANSFORMS, in timm's order.
OP_NAMES = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
            'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
            'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel')


# ---------------------------------------------------------------------------
# Colour ops (uint8 [H, W, 3] in, uint8 out), each equal to the PIL call timm makes.
# ---------------------------------------------------------------------------

def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `Image.blend(degenerate, image, factor)`: float32 lerp, clip, truncate."""
  factor = tf.cast(factor, tf.float32)
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion (ITU-R 601-2 luma, 16-bit fixed point, rounded), int32."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.bitwise.right_shift(luma, 16)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.autocontrast(image)`: stretch each channel's [min, max] to [0, 255]."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  stretch = hi > lo  # a flat channel is left as it is
  scale = tf.where(stretch, 255.0 / tf.where(stretch, hi - lo, 1.0), 1.0)
  offset = tf.where(stretch, -lo * scale, 0.0)
  out = tf.cast(x * scale + offset, tf.int32)  # Python int(): truncation
  return tf.cast(tf.clip_by_value(out, 0, 255), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.equalize(image)`: PIL's per-channel histogram equalisation (integer LUT)."""
  shape = tf.shape(image)
  values = tf.reshape(tf.cast(image, tf.int32), [-1, 3]) + tf.constant([0, 256, 512])
  hist = tf.reshape(tf.math.bincount(tf.reshape(values, [-1]), minlength=768,
                                     maxlength=768), [3, 256])
  nonzero = hist > 0
  last_bin = 255 - tf.argmax(tf.cast(tf.reverse(nonzero, axis=[1]), tf.int32), axis=1,
                             output_type=tf.int32)
  last_count = tf.gather(hist, last_bin, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
  keep = (tf.reduce_sum(tf.cast(nonzero, tf.int32), axis=1) <= 1) | (step == 0)
  safe_step = tf.maximum(step, 1)[:, None]
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((safe_step // 2 + below) // safe_step, 255)
  lut = tf.where(keep[:, None], tf.range(256)[None, :], lut)
  out = tf.gather(tf.reshape(lut, [-1]), values)
  return tf.reshape(tf.cast(out, tf.uint8), shape)


def invert(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.invert(image)`."""
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """`ImageOps.posterize(image, bits)`: keep the `bits` high bits (0 bits -> black)."""
  shift = 8 - tf.cast(bits, tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """`ImageOps.solarize(image, threshold)`: invert pixels >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, add, threshold=128) -> tf.Tensor:
  """timm's `solarize_add`: add `add` (capped at 255) to pixels below `threshold`."""
  x = tf.cast(image, tf.int32)
  out = tf.where(x < tf.cast(threshold, tf.int32), tf.minimum(x + tf.cast(add, tf.int32), 255), x)
  return tf.cast(out, tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Color(image).enhance(factor)`: blend with the greyscale image."""
  gray = tf.repeat(_grayscale(image)[..., None], 3, axis=-1)
  return _blend(gray, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Contrast(image).enhance(factor)`: blend with the mean grey level."""
  gray = _grayscale(image)
  mean = (tf.cast(tf.reduce_sum(tf.cast(gray, tf.int64)), tf.float64) /
          tf.cast(tf.size(gray), tf.float64))
  return _blend(tf.floor(mean + 0.5), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Brightness(image).enhance(factor)`: blend with black."""
  return _blend(tf.zeros([], tf.float32), image, factor)


_SMOOTH_EDGE = np.float32(1) / np.float32(13)  # ImageFilter.SMOOTH = [1 1 1; 1 5 1; 1 1 1] / 13
_SMOOTH_CENTRE = np.float32(5) / np.float32(13)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """`image.filter(ImageFilter.SMOOTH)`, summed in PIL's float32 order; the 1-pixel
  border is copied unchanged, as PIL does."""
  x = tf.cast(image, tf.float32)

  def row(r, centre):
    return r[:, :-2] * _SMOOTH_EDGE + r[:, 1:-1] * centre + r[:, 2:] * _SMOOTH_EDGE

  total = 0.5 + row(x[2:], _SMOOTH_EDGE)  # +0.5: PIL rounds to nearest
  total = total + row(x[1:-1], _SMOOTH_CENTRE)
  total = total + row(x[:-2], _SMOOTH_EDGE)
  inner = tf.cast(tf.clip_by_value(total, 0.0, 255.0), tf.uint8)
  middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
  return tf.concat([image[:1], middle, image[-1:]], axis=0)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Sharpness(image).enhance(factor)`: blend with the smoothed image."""
  return _blend(_smooth(image), image, factor)


# ---------------------------------------------------------------------------
# Geometric ops: PIL `Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill)`.
# `matrix` (a, b, c, d, e, f) maps an output pixel centre (x + .5, y + .5) to the input
# point (a x' + b y' + c, d x' + e y' + f), as in PIL.
# ---------------------------------------------------------------------------

def _f64(x) -> tf.Tensor:
  """float64 tensor; Python floats go straight to float64 (tf.cast would round them to
  float32 first)."""
  if isinstance(x, (tf.Tensor, tf.Variable, np.ndarray)):
    return tf.cast(x, tf.float64)
  return tf.constant(x, tf.float64)


def _cubic(v1, v2, v3, v4, d):
  """PIL's BICUBIC kernel (a = -1), in its evaluation order, between v2 (d=0) and v3."""
  p2 = -v1 + v3
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def _cubic_of_taps(v1, v2, v3, v4, d):
  """`_cubic` on integer taps: the coefficients are exact integers, so they are formed in
  int32 (cheaper) and only the polynomial runs in float64, as in PIL."""
  p2 = tf.cast(v3 - v1, tf.float64)
  p3 = tf.cast(2 * (v1 - v2) + v3 - v4, tf.float64)
  p4 = tf.cast(v2 - v1 + v4 - v3, tf.float64)
  return tf.cast(v2, tf.float64) + d * (p2 + d * (p3 + d * p4))


def _taps(coord, size):
  """PIL's four edge-clamped tap indices (tap-major list) and the fraction (..., 1) for
  PIL coordinates `coord`."""
  pos = coord - 0.5
  base = tf.floor(pos)
  frac = (pos - base)[..., None]
  base = tf.cast(base, tf.int32)
  return [tf.clip_by_value(base + k, 0, size - 1) for k in (-1, 0, 1, 2)], frac


def _to_uint8(v):
  return tf.cast(tf.clip_by_value(v, 0.0, 255.0), tf.uint8)


def _fill_outside(out, inside, fill):
  return tf.where(inside[..., None], out, tf.constant(fill, tf.uint8))


def _pixel_centres(height, width):
  ys = tf.range(height, dtype=tf.float64)[:, None] + 0.5
  xs = tf.range(width, dtype=tf.float64)[None, :] + 0.5
  return xs, ys


def _source_points(image, matrix):
  """(flat int32 pixels (H*W, 3), H, W, src_x, src_y, inside) for an affine `matrix`."""
  a, b, c, d, e, f = [_f64(m) for m in matrix]
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  xs, ys = _pixel_centres(height, width)
  src_x = a * xs + b * ys + c  # PIL: a * (x + .5) + b * (y + .5) + c, in double
  src_y = d * xs + e * ys + f
  inside = ((src_x >= 0.0) & (src_x < tf.cast(width, tf.float64)) &
            (src_y >= 0.0) & (src_y < tf.cast(height, tf.float64)))
  return tf.reshape(tf.cast(image, tf.int32), [-1, 3]), height, width, src_x, src_y, inside


def _shift_rows(image, a, b, c, fill):
  """Affine with matrix (a, b, c, 0, 1, 0): every output pixel samples its own row, so
  PIL's vertical cubic sits at d = 0 and returns that row exactly."""
  flat, height, width, src_x, _, inside = _source_points(image, (a, b, c, 0.0, 1.0, 0.0))
  cols, frac = _taps(src_x, width)
  row_start = tf.range(height)[:, None] * width
  v = [tf.gather(flat, col + row_start) for col in cols]  # 4 x (H, W, 3)
  return _fill_outside(_to_uint8(_cubic_of_taps(*v, frac)), inside, fill)


def _shift_columns(image, d, e, f, fill):
  """Affine with matrix (1, 0, 0, d, e, f): every output pixel samples its own column."""
  flat, height, width, _, src_y, inside = _source_points(image, (1.0, 0.0, 0.0, d, e, f))
  rows, frac = _taps(src_y, height)
  col = tf.range(width)[None, :]
  v = [tf.gather(flat, row * width + col) for row in rows]
  return _fill_outside(_to_uint8(_cubic_of_taps(*v, frac)), inside, fill)


def affine_transform(image: tf.Tensor, matrix: Sequence, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """`image.transform(image.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=fill)`.

  Args:
    image: uint8 [H, W, 3].
    matrix: six scalars (a, b, c, d, e, f), output -> input, PIL's convention.
    fill: RGB colour of pixels whose source point lies outside the image.
  Returns:
    uint8 [H, W, 3].
  """
  flat, height, width, src_x, src_y, inside = _source_points(image, matrix)
  cols, fx = _taps(src_x, width)
  rows, fy = _taps(src_y, height)
  # PIL: a horizontal cubic on each of the 4 source rows, then a vertical one.
  per_row = [_cubic_of_taps(*[tf.gather(flat, row * width + col) for col in cols], fx)
             for row in rows]
  return _fill_outside(_to_uint8(_cubic(*per_row, fy)), inside, fill)


def rotate(image: tf.Tensor, degrees, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """`image.rotate(degrees, resample=BICUBIC, fillcolor=fill)`: counter-clockwise about
  the centre, same size, with PIL's matrix (cos/sin rounded to 15 decimals)."""
  shape = tf.shape(image)
  cx = tf.cast(shape[1], tf.float64) / 2.0
  cy = tf.cast(shape[0], tf.float64) / 2.0
  angle = -tf.math.floormod(_f64(degrees), 360.0) * (math.pi / 180.0)
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return affine_transform(image, (cos, sin, c, -sin, cos, f), fill)


def shear_x(image: tf.Tensor, factor, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """timm's `shear_x`: affine (1, factor, 0, 0, 1, 0)."""
  return _shift_rows(image, 1.0, _f64(factor), 0.0, fill)


def shear_y(image: tf.Tensor, factor, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """timm's `shear_y`: affine (1, 0, 0, factor, 1, 0)."""
  return _shift_columns(image, _f64(factor), 1.0, 0.0, fill)


def translate_x_rel(image: tf.Tensor, pct, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """timm's `translate_x_rel`: affine (1, 0, pct * width, 0, 1, 0)."""
  pixels = _f64(pct) * tf.cast(tf.shape(image)[1], tf.float64)
  return _shift_rows(image, 1.0, 0.0, pixels, fill)


def translate_y_rel(image: tf.Tensor, pct, fill=IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """timm's `translate_y_rel`: affine (1, 0, 0, 0, 1, pct * height)."""
  pixels = _f64(pct) * tf.cast(tf.shape(image)[0], tf.float64)
  return _shift_columns(image, 0.0, 1.0, pixels, fill)


# ---------------------------------------------------------------------------
# timm's level -> argument mappings and the op table.
# ---------------------------------------------------------------------------

def _signed(value, negate):
  return tf.where(negate, -value, value)


def _enhance_factor(level, negate):
  """timm's _enhance_increasing_level_to_arg: 1 -/+ 0.9 * level / 10, at least 0.1."""
  return tf.maximum(1.0 + _signed(level / MAX_LEVEL * 0.9, negate), 0.1)


def _int(x):
  return tf.cast(x, tf.int32)  # Python int() of a non-negative float


_OPS = {
    'AutoContrast': lambda img, level, negate, fill: auto_contrast(img),
    'Equalize': lambda img, level, negate, fill: equalize(img),
    'Invert': lambda img, level, negate, fill: invert(img),
    'Rotate': lambda img, level, negate, fill: rotate(
        img, _signed(level / MAX_LEVEL * 30.0, negate), fill),
    'PosterizeIncreasing': lambda img, level, negate, fill: posterize(
        img, 4 - _int(level / MAX_LEVEL * 4.0)),
    'SolarizeIncreasing': lambda img, level, negate, fill: solarize(
        img, 256 - _int(level / MAX_LEVEL * 256.0)),
    'SolarizeAdd': lambda img, level, negate, fill: solarize_add(
        img, _int(level / MAX_LEVEL * 110.0)),
    'ColorIncreasing': lambda img, level, negate, fill: color(img, _enhance_factor(level, negate)),
    'ContrastIncreasing': lambda img, level, negate, fill: contrast(
        img, _enhance_factor(level, negate)),
    'BrightnessIncreasing': lambda img, level, negate, fill: brightness(
        img, _enhance_factor(level, negate)),
    'SharpnessIncreasing': lambda img, level, negate, fill: sharpness(
        img, _enhance_factor(level, negate)),
    'ShearX': lambda img, level, negate, fill: shear_x(
        img, _signed(level / MAX_LEVEL * 0.3, negate), fill),
    'ShearY': lambda img, level, negate, fill: shear_y(
        img, _signed(level / MAX_LEVEL * 0.3, negate), fill),
    'TranslateXRel': lambda img, level, negate, fill: translate_x_rel(
        img, _signed(level / MAX_LEVEL * 0.45, negate), fill),
    'TranslateYRel': lambda img, level, negate, fill: translate_y_rel(
        img, _signed(level / MAX_LEVEL * 0.45, negate), fill),
}
assert tuple(_OPS) == OP_NAMES


def _check_image(image: tf.Tensor, dtype, caller: str) -> None:
  if image.dtype != dtype:
    fix = ('apply it before normalisation, to the uint8 crop' if dtype == tf.uint8 else
           'apply it after converting to float and normalising')
    raise TypeError(f'{caller} expects a {dtype.name} image, got {image.dtype.name}: {fix}.')
  if image.shape.rank is not None and (image.shape.rank != 3 or image.shape[-1] not in (None, 3)):
    raise ValueError(f'{caller} expects one [H, W, 3] image, got shape {image.shape}: '
                     'map it over the dataset before batching.')


@tf.autograph.experimental.do_not_convert
def apply_op(image: tf.Tensor, name: str, magnitude, negate=False,
             fill: Sequence[int] = IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """Applies one of timm's RandAugment ops at magnitude `magnitude` (0-10).

  The argument comes from timm's level mapping: rotate 30 deg, shear 0.3, translate 0.45
  of the size, enhance factor 1 -/+ 0.9, posterize 4 -> 0 bits, solarize threshold
  256 -> 0, solarize-add 0 -> 110, all at magnitude 10; `negate` flips the sign of the
  signed ops (timm flips it with probability 0.5).
  """
  if name not in _OPS:
    raise ValueError(f'Unknown RandAugment op {name!r}: choose one of {", ".join(OP_NAMES)}.')
  _check_image(image, tf.uint8, 'apply_op')
  level = tf.clip_by_value(_f64(magnitude), 0.0, MAX_LEVEL)
  return _OPS[name](image, level, tf.cast(negate, tf.bool), tuple(fill))


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors
def rand_augment(image_uint8: tf.Tensor, seed: tf.Tensor, num_ops: int = 2,
                 magnitude: float = 9, magnitude_std: float = 0.5, op_prob: float = 0.5,
                 fill: Sequence[int] = IMAGENET_MEAN_UINT8) -> tf.Tensor:
  """timm's RandAugment 'rand-m{magnitude}-mstd{magnitude_std}-inc1' on one image.

  Args:
    image_uint8: uint8 [H, W, 3] (after the random resized crop and flip).
    seed: int32/int64 [2] stateless seed; the same seed gives the same output.
    num_ops: ops per image, drawn uniformly with replacement from `OP_NAMES`.
    magnitude: mean magnitude (0-10).
    magnitude_std: per-op magnitude ~ N(magnitude, magnitude_std), clipped to [0, 10];
      0 keeps it fixed, inf draws it uniformly from [0, magnitude] (timm's conventions).
    op_prob: probability that each drawn op is applied.
    fill: colour of the area geometric ops bring in (timm's img_mean).
  Returns:
    uint8 [H, W, 3].
  """
  _check_image(image_uint8, tf.uint8, 'rand_augment')
  if int(num_ops) != num_ops or num_ops < 0:
    raise ValueError(f'num_ops must be a non-negative int, got {num_ops!r}: timm uses 2.')
  if magnitude_std < 0:
    raise ValueError(f'magnitude_std must be >= 0 (or inf), got {magnitude_std}: MAE uses 0.5.')
  num_ops, fill = int(num_ops), tuple(int(v) for v in fill)
  if num_ops == 0:
    return image_uint8
  seeds = tf.random.split(seed, 4)
  op_index = tf.random.stateless_uniform([num_ops], seeds[0], minval=0, maxval=len(OP_NAMES),
                                         dtype=tf.int32)
  apply_draw, sign_draw = tf.unstack(
      tf.random.stateless_uniform([2, num_ops], seeds[1], dtype=tf.float64))
  if magnitude_std == float('inf'):
    levels = tf.random.stateless_uniform([num_ops], seeds[2], 0.0, magnitude, dtype=tf.float64)
  elif magnitude_std > 0:
    levels = magnitude + magnitude_std * tf.random.stateless_normal([num_ops], seeds[2],
                                                                    dtype=tf.float64)
  else:
    levels = tf.fill([num_ops], tf.constant(magnitude, tf.float64))
  levels = tf.clip_by_value(levels, 0.0, MAX_LEVEL)
  # timm: skip when random() > prob; negate when random() > 0.5.
  branch = tf.where(apply_draw <= op_prob, op_index, len(OP_NAMES))  # last branch: no-op
  negate = sign_draw > 0.5

  def body(i, image):
    branches = [(lambda op=op: op(image, levels[i], negate[i], fill)) for op in _OPS.values()]
    out = tf.switch_case(branch[i], branches + [lambda: image])
    return i + 1, tf.ensure_shape(out, image_uint8.shape)

  # One switch_case in a loop: the 15 branches are traced once, and only the drawn op runs.
  _, image = tf.while_loop(lambda i, _: i < num_ops, body, (tf.constant(0), image_uint8))
  return image


@tf.autograph.experimental.do_not_convert
def random_erase(image: tf.Tensor, seed: tf.Tensor, probability: float = 0.25,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                 mode: str = 'pixel', max_attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing(probability, mode, max_count=1) on one normalised image.

  With probability `probability`, up to `max_attempts` times: draw an area fraction
  U(min_area, max_area) and a log-uniform aspect ratio in [min_aspect, 1/min_aspect];
  h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first box that fits
  (h < H and w < W) is placed uniformly and filled with per-pixel N(0, 1) noise
  ('pixel'), one N(0, 1) colour ('rand') or zeros ('const').

  Args:
    image: float32 [H, W, C], already mean/std normalised.
    seed: int32/int64 [2] stateless seed; the same seed gives the same output.
  Returns:
    float32 [H, W, C].
  """
  _check_image(image, tf.float32, 'random_erase')
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f'probability must be in [0, 1], got {probability}: MAE uses 0.25.')
  if not 0.0 < min_area <= max_area <= 1.0:
    raise ValueError(f'Need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}: '
                     'timm uses 0.02 and 1/3.')
  if not 0.0 < min_aspect:
    raise ValueError(f'min_aspect must be > 0, got {min_aspect}: timm uses 0.3.')
  if mode not in ('pixel', 'rand', 'const'):
    raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}.")
  seeds = tf.random.split(seed, 6)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float64)
  target_area = tf.random.stateless_uniform([max_attempts], seeds[1], min_area, max_area,
                                            dtype=tf.float64) * area
  aspect = tf.exp(tf.random.stateless_uniform(
      [max_attempts], seeds[2], math.log(min_aspect), math.log(1 / min_aspect),
      dtype=tf.float64))
  # Python's round() is round-half-even, like tf.round.
  box_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (box_h < height) & (box_w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  erase = ((tf.random.stateless_uniform([], seeds[0], dtype=tf.float64) <= probability) &
           tf.reduce_any(fits))

  def erased():
    h, w = box_h[first], box_w[first]
    top = tf.random.stateless_uniform([], seeds[3], 0, height - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[4], 0, width - w + 1, dtype=tf.int32)
    rows = tf.range(height)
    cols = tf.range(width)
    inside = (((rows >= top) & (rows < top + h))[:, None] &
              ((cols >= left) & (cols < left + w))[None, :])
    if mode == 'pixel':  # noise for the box only, placed by padding (timm draws (C, h, w))
      noise = tf.pad(tf.random.stateless_normal([h, w, shape[2]], seeds[5], dtype=image.dtype),
                     [[top, height - top - h], [left, width - left - w], [0, 0]])
    elif mode == 'rand':
      noise = tf.random.stateless_normal([1, 1, shape[2]], seeds[5], dtype=image.dtype)
    else:
      noise = tf.zeros([], image.dtype)
    return tf.where(inside[..., None], noise, image)

  return tf.ensure_shape(tf.cond(erase, erased, lambda: image), image.shape)
