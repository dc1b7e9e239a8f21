"""Image transforms of the MAE recipes as stateless TensorFlow ops, for tf.data map functions.

The reference feeds PIL images through torchvision; these ops reproduce that pipeline:
- `random_resized_crop`: torchvision's `RandomResizedCrop.get_params` (10 tries, then the
  centre-crop fallback) and a bicubic resize, antialiased when shrinking as PIL's is, rounded
  to uint8. JPEGs are decoded only inside the crop window.
- `flip_left_right`: `RandomHorizontalFlip(0.5)`.
- `resize_and_centre_crop`: `Resize(int(size / 0.875), bicubic)` + `CenterCrop(size)`, with
  PIL's two-pass rounding, so evaluation sees PIL's pixels within one grey level.
- `normalize`: `ToTensor()` + `Normalize(mean, std)`.
All randomness comes from an explicit stateless seed (a `[2]` int tensor).

A "raw" image is either encoded bytes (tf.string scalar, JPEG/PNG/GIF/BMP) or a decoded
uint8 `[H, W, 3]` tensor; every function here accepts both.
"""
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, 3] (grey is repeated, alpha dropped).

  JPEGs use the accurate integer IDCT, which libjpeg (and so PIL) uses by default.
  """
  def jpeg():
    return tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE')

  def other():
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def random_resized_crop_box(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                            scale: Sequence[float],
                            ratio: Sequence[float] = CROP_RATIO) -> tf.Tensor:
  """torchvision's `RandomResizedCrop.get_params`: returns `[top, left, crop_h, crop_w]` int32.

  Up to 10 tries draw an area fraction uniformly in `scale` and a log-uniform aspect ratio
  in `ratio`; the first box that fits is placed uniformly at random. If none fits, the
  whole image clamped to the ratio range is centre-cropped. All tries are drawn at once.
  """
  size = tf.cast(tf.stack([height, width]), tf.int32)
  size_f = tf.cast(size, tf.float64)
  u = tf.random.stateless_uniform([2 * RRC_ATTEMPTS + 2], seed, dtype=tf.float64)
  area = size_f[0] * size_f[1] * (scale[0] + (scale[1] - scale[0]) * u[:RRC_ATTEMPTS])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  log_aspect = log_lo + (log_hi - log_lo) * u[RRC_ATTEMPTS:2 * RRC_ATTEMPTS]  # log(w / h)
  # [2, tries] of (h, w) = sqrt(area / aspect), sqrt(area * aspect); tf.round rounds half to
  # even like Python's round() in torchvision.
  crop_hw = tf.cast(tf.round(tf.sqrt(area * tf.exp(tf.stack([-log_aspect, log_aspect])))),
                    tf.int32)
  fits = tf.reduce_all((crop_hw > 0) & (crop_hw <= size[:, None]), axis=0)
  found = tf.reduce_any(fits)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Fallback: the whole image with its aspect ratio clamped to `ratio`, centred.
  fallback = tf.minimum(size, tf.cast(tf.round(size_f[::-1] * [1 / min(ratio), max(ratio)]),
                                      tf.int32))
  crop_hw = tf.where(found, crop_hw[:, first], fallback)
  random_offset = tf.cast(tf.floor(u[-2:] * tf.cast(size - crop_hw + 1, tf.float64)), tf.int32)
  offset = tf.where(found, random_offset, (size - crop_hw) // 2)
  return tf.concat([offset, crop_hw], 0)


def _bicubic(image: tf.Tensor, height, width, shrinking: tf.Tensor) -> tf.Tensor:
  """tf.image.resize bicubic (Keys a = -0.5, PIL's kernel), rounded and clipped to 0..255.

  Antialiasing (PIL widens the kernel when shrinking) changes nothing when no axis shrinks,
  and the plain kernel is ~4x cheaper, so it is used then.
  """
  size = tf.stack([height, width])

  def resize(antialias):
    resized = tf.image.resize(image, size, method='bicubic', antialias=antialias)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

  return tf.cond(shrinking, lambda: resize(True), lambda: resize(False))


def resize_bicubic(image: tf.Tensor, height, width, exact: bool = False) -> tf.Tensor:
  """PIL's `Image.resize((width, height), BICUBIC)` -> uint8.

  exact=False: one 2-D pass; within a grey level of PIL on photos, a few levels on noise-like
    detail. exact=True: PIL's two 1-D passes with rounding to uint8 in between, in Pillow's
    order (the vertical pass first when the height shrinks by more than twice as many pixels
    as the width); within two levels of PIL on any content, at ~1.6x the cost.
  """
  shape = tf.shape(image, out_type=tf.int32)
  in_h, in_w = shape[0], shape[1]
  x = tf.cast(image, tf.float32)
  if not exact:
    return tf.cast(_bicubic(x, height, width, (in_h > height) | (in_w > width)), tf.uint8)

  def horizontal_then_vertical():
    y = _bicubic(x, in_h, width, in_w > width)
    return _bicubic(y, height, width, in_h > height)

  def vertical_then_horizontal():
    y = _bicubic(x, height, in_w, in_h > height)
    return _bicubic(y, height, width, in_w > width)

  vertical_first = (in_h > height) & (in_h - height > 2 * (in_w - width))
  return tf.cast(tf.cond(vertical_first, vertical_then_horizontal, horizontal_then_vertical),
                 tf.uint8)


def random_resized_crop(raw: tf.Tensor, seed: tf.Tensor, size: int, scale: Sequence[float],
                        ratio: Sequence[float] = CROP_RATIO) -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio, bicubic) -> uint8 [size, size, 3].

  JPEG bytes: the box is drawn from the header's size and only the box is decoded.
  """
  def crop_array(image):
    shape = tf.shape(image, out_type=tf.int32)
    box = random_resized_crop_box(shape[0], shape[1], seed, scale, ratio)
    return image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

  def crop_jpeg():
    shape = tf.image.extract_jpeg_shape(raw, output_type=tf.int32)
    box = random_resized_crop_box(shape[0], shape[1], seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(raw, box, channels=3, dct_method='INTEGER_ACCURATE')

  if raw.dtype == tf.string:
    cropped = tf.cond(tf.io.is_jpeg(raw), crop_jpeg, lambda: crop_array(decode_rgb(raw)))
    cropped.set_shape([None, None, 3])
  else:
    cropped = crop_array(raw)
  image = resize_bicubic(cropped, size, size)
  image.set_shape([size, size, 3])
  return image


def flip_left_right(image: tf.Tensor, seed: tf.Tensor, probability: float = 0.5) -> tf.Tensor:
  """Mirrors the image with the given probability."""
  flip = tf.random.stateless_uniform([], seed) < probability
  # tf.reverse, not image[:, ::-1]: the same pixels, but a negative-stride slice takes TF's
  # slow element-by-element path (about 0.5 ms of a 224 px image's ~5 ms on one core).
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def resize_and_centre_crop(raw: tf.Tensor, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """torchvision `Resize(int(size / crop_fraction))` (shorter side, bicubic), `CenterCrop(size)`."""
  resize_to = int(size / crop_fraction)
  image = decode_rgb(raw) if raw.dtype == tf.string else raw
  shape = tf.shape(image, out_type=tf.int32)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  # torchvision: new_long = int(new_short * long / short), truncated.
  new_long = tf.cast(
      tf.math.floor(resize_to * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
  new_h = tf.where(height <= width, resize_to, new_long)
  new_w = tf.where(height <= width, new_long, resize_to)
  image = resize_bicubic(image, new_h, new_w, exact=True)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2), tf.int32)
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return image


def normalization_constants(mean: Sequence[float], std: Sequence[float]):
  """float32 `(255 mean, 1 / (255 std))`: `normalize` is `(x - first) * second` on 0..255 pixels."""
  scaled_mean = np.asarray(mean, np.float32) * np.float32(255.0)
  inv_std = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
  return scaled_mean, inv_std


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 (or 0..255 float) pixels -> float32 `(x / 255 - mean) / std`, channels last.

  Computed as `(x - 255 mean) * (1 / (255 std))`. When the image dims are static the mean
  and scale are tiled to one image's row of `H * W * C` values: TF (Eigen) broadcasts one
  row over a matrix of images about 2.5x faster than a 3-vector over every pixel, for the
  same values (0.25 against 0.65 ms per 224 px image on one core).
  """
  images = tf.cast(images, tf.float32)
  mean, inv_std = normalization_constants(mean, std)
  shape = images.shape
  if shape.rank is None or shape.rank < 3 or not shape[-3:].is_fully_defined():
    return (images - mean) * inv_std
  height, width, channels = shape[-3:]
  rows = tf.reshape(images, [-1, height * width * channels])
  rows = (rows - np.tile(mean, height * width)) * np.tile(inv_std, height * width)
  return tf.reshape(rows, tf.shape(images))
