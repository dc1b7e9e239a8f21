"""Image transforms of the MAE recipes as stateless TensorFlow ops, for tf.data map functions.

The reference feeds PIL images through torchvision; these ops reproduce that pipeline:
- `random_resized_crop`: torchvision's `RandomResizedCrop.get_params` (10 tries, then the
  centre-crop fallback), a bicubic antialiased resize (PIL's bicubic, within one grey level)
  and rounding to uint8 as PIL does. JPEGs are decoded only inside the crop window.
- `flip_left_right`: `RandomHorizontalFlip(0.5)`.
- `resize_and_centre_crop`: `Resize(int(size / 0.875), bicubic)` + `CenterCrop(size)`.
- `normalize`: `ToTensor()` + `Normalize(mean, std)`.
All randomness comes from an explicit stateless seed (a `[2]` int tensor).

A "raw" image is either encoded bytes (tf.string scalar, JPEG/PNG/GIF/BMP) or a decoded
uint8 `[H, W, 3]` tensor; every function here accepts both.
"""
import math
from typing import Sequence

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
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f = tf.cast(height, tf.float64)
  w_f = tf.cast(width, tf.float64)
  area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  target_area = h_f * w_f * tf.random.stateless_uniform(
      [RRC_ATTEMPTS], area_seed, scale[0], scale[1], dtype=tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [RRC_ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64))
  # tf.round rounds half to even, as Python's round() in torchvision does.
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)

  in_ratio = w_f / h_f
  lo, hi = min(ratio), max(ratio)
  fallback_w = tf.where(in_ratio > hi, tf.cast(tf.round(h_f * hi), tf.int32), width)
  fallback_h = tf.where(in_ratio < lo, tf.cast(tf.round(w_f / lo), tf.int32), height)

  crop_h = tf.where(found, crop_h[first], fallback_h)
  crop_w = tf.where(found, crop_w[first], fallback_w)
  u = tf.random.stateless_uniform([2], offset_seed, dtype=tf.float64)
  random_top = tf.cast(tf.floor(u[0] * tf.cast(height - crop_h + 1, tf.float64)), tf.int32)
  random_left = tf.cast(tf.floor(u[1] * tf.cast(width - crop_w + 1, tf.float64)), tf.int32)
  top = tf.where(found, random_top, (height - crop_h) // 2)
  left = tf.where(found, random_left, (width - crop_w) // 2)
  return tf.stack([top, left, crop_h, crop_w])


def resize_bicubic(image: tf.Tensor, height, width) -> tf.Tensor:
  """PIL-style bicubic resize (antialiased when shrinking), rounded to uint8."""
  resized = tf.image.resize(image, tf.stack([height, width]), method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


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
  return tf.cond(flip, lambda: image[:, ::-1], lambda: image)


def resize_and_centre_crop(raw: tf.Tensor, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """torchvision `Resize(int(size / crop_fraction))` (shorter side, bicubic) + `CenterCrop(size)`."""
  resize_to = int(size / crop_fraction)
  image = decode_rgb(raw) if raw.dtype == tf.string else raw
  shape = tf.shape(image, out_type=tf.int32)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  # torchvision: new_long = int(new_short * long / short), truncated.
  new_long = tf.cast(tf.math.floor(resize_to * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)),
                     tf.int32)
  new_h = tf.where(height <= width, resize_to, new_long)
  new_w = tf.where(height <= width, new_long, resize_to)
  image = resize_bicubic(image, new_h, new_w)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2), tf.int32)
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return image


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 (or 0..255 float) pixels -> float32 `(x / 255 - mean) / std`, channels last."""
  images = tf.cast(images, tf.float32)
  mean = tf.constant(mean, tf.float32) * 255.0
  inv_std = 1.0 / (tf.constant(std, tf.float32) * 255.0)
  return (images - mean) * inv_std
