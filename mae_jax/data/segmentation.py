"""Segmentation input: images with masks -> deterministic batches, augmented together.

The stream is the one of `mae_jax.data.pipeline`: global batch `s` holds stream positions
`s * global_batch + j`; a training position `g` shows example `perm_e[g % N]` of epoch
`g // N` and draws its augmentation from stateless ops seeded by `(seed, g)`, so batches
depend on neither the host nor the device count and a resumed run reads exactly the
batches an uninterrupted one would. Sources read in order (TFDS TFRecords) use a seeded
shuffle buffer per epoch instead.

Training augmentation, mmsegmentation's ADE20K pipeline applied to image and mask alike:
1. random rescale, keeping the aspect ratio: a ratio r ~ U(scale_range) (0.5-2), the
   image scaled so that it fits in (4 S r) x (S r) (mmseg's `RandomResize(scale=(2048,
   512), ratio_range=(0.5, 2.0))` for S = 512), sizes rounded as mmcv rounds them; the
   image bilinearly, the mask by nearest neighbour (both with half-pixel centres);
2. a random S x S crop (smaller where the image is smaller), re-drawn up to 10 times
   while one class covers more than `cat_max_ratio` (0.75) of its labelled pixels
   (mmseg's `RandomCrop(cat_max_ratio=0.75)`);
3. horizontal flip with probability 0.5;
4. normalise, and pad to S x S: image with 0 (after normalisation), mask with the ignore
   label. mmseg's `PhotoMetricDistortion` (colour jitter) is not applied.
Evaluation: the whole image scaled (bilinear / nearest) so that its longer side is S, then
padded to S x S the same way, so every pixel of every image is scored (at that size).
"""
import math
from typing import Any, Callable, Dict, Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from mae_jax.data import pipeline
from mae_jax.data import preprocess
from mae_jax.data import seg_sources
from mae_jax.data import unreadable

SOURCES = ('scenes', 'folder', 'tfds')
MODES = ('train', 'eval')
CROP_TRIES = 10  # mmseg's RandomCrop
_AUGMENT_SALT = 0x736567  # separates these seeds from the classification pipeline's


def default_dataset_config() -> ml_collections.ConfigDict:
  """All fields of a segmentation `config.dataset`.

  source: 'scenes' (synthetic, generated in memory), 'folder' (seg_sources.FOLDER_LAYOUT,
    ADE20K's ADEChallengeData2016 as released) or 'tfds'.
  name, data_dir, manual_dir, download, tfds_read, shuffle_buffer: as in the
    classification pipeline (data_dir is also the folder root).
  train_split / eval_split: scenes 'train'/'test'; folder subdirectory names; TFDS splits.
  image_key / mask_key: TFDS features of the image and the mask.
  mask_channel: None (masks hold one channel) or the channel with the class id.
  reduce_zero_label: stored id 0 becomes the ignore label and k becomes k - 1 (ADE20K).
  ignore_index: the label that is neither trained on nor scored (255).
  mean / std: normalisation, 0..1 units.
  scale_range, cat_max_ratio, flip: the training augmentation (module docstring).
  scenes_train / scenes_eval / scene_size / scenes_seed: the synthetic set (scene_size 0:
    the model's input size).
  verify_masks: read every mask before training to check sizes and class ids.
  """
  return ml_collections.ConfigDict(dict(
      source='scenes', name='', data_dir='', manual_dir='', download=False,
      train_split='train', eval_split='test', image_key='image', mask_key='annotation',
      mask_channel=ml_collections.config_dict.placeholder(int), reduce_zero_label=False,
      ignore_index=255, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD,
      scale_range=(0.5, 2.0), cat_max_ratio=0.75, flip=True, scenes_train=512, scenes_eval=128,
      scene_size=0, scenes_seed=0, verify_masks=True, tfds_read='auto', shuffle_buffer=1024))


def resolve_config(dataset_cfg: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with `dataset_cfg`; unknown fields and sources raise, naming them."""
  cfg = default_dataset_config()
  given = dict(dataset_cfg.items()) if dataset_cfg is not None else {}
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f'Unknown segmentation dataset field(s) {unknown}; known fields: '
                     f'{sorted(cfg)} (see mae_jax.data.segmentation.default_dataset_config).')
  for key, value in given.items():
    cfg[key] = value
  if cfg.source not in SOURCES:
    raise ValueError(f'Unknown segmentation source {cfg.source!r}: set config.dataset.source to '
                     f'one of {SOURCES}.')
  lo, hi = cfg.scale_range
  if not 0 < lo <= hi:
    raise ValueError(f'config.dataset.scale_range={tuple(cfg.scale_range)} must be 0 < lo <= hi.')
  return cfg


def num_examples(dataset_cfg: Any, split: str, image_size: int = 64) -> int:
  """Examples in `split`."""
  cfg = resolve_config(dataset_cfg)
  if cfg.source == 'scenes':
    return seg_sources.scene_count(cfg, split)
  return seg_sources.open_source(cfg, split, image_size).num_examples


def num_classes(dataset_cfg: Any) -> Optional[int]:
  """Classes the source defines (scenes: background + shape kinds), else None."""
  if resolve_config(dataset_cfg).source == 'scenes':
    from mae_jax.data import scenes  # pylint: disable=g-import-not-at-top
    return scenes.NUM_CLASSES
  return None


def verify_split(dataset_cfg: Any, split: str, num_classes_: int, image_size: int,
                 max_examples: Optional[int] = None) -> None:
  """`seg_sources.verify` on a split (every mask read once; raises naming the file)."""
  cfg = resolve_config(dataset_cfg)
  seg_sources.verify(seg_sources.open_source(cfg, split, image_size), cfg, num_classes_,
                     max_examples=max_examples)


# ----------------------------------------------------------------------------- transforms
def _resize_pair(image, labels, hw, ignore_index):
  image = tf.image.resize(tf.cast(image, tf.float32), hw, method='bilinear', antialias=False)
  labels = tf.image.resize(labels[..., None], hw, method='nearest')[..., 0]
  return image, labels


def _pad_pair(image, labels, size, ignore_index):
  """Pads at the bottom/right to size x size: image 0 (normalised), mask ignore."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  pad = [[0, size - h], [0, size - w]]
  image = tf.pad(image, pad + [[0, 0]])
  labels = tf.pad(labels, pad, constant_values=ignore_index)
  image.set_shape([size, size, 3])
  labels.set_shape([size, size])
  return image, labels


def rescale_size(h: tf.Tensor, w: tf.Tensor, long_side: tf.Tensor, short_side: tf.Tensor):
  """mmcv's rescale_size with keep_ratio: the factor that fits (long, short), sizes
  `int(x * factor + 0.5)`."""
  h, w = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  factor = tf.minimum(long_side / tf.maximum(h, w), short_side / tf.minimum(h, w))
  return tf.stack([tf.cast(h * factor + 0.5, tf.int32), tf.cast(w * factor + 0.5, tf.int32)])


def _crop_box(h, w, size, seed):
  """mmseg RandomCrop.get_crop_bbox: offsets uniform in [0, margin]."""
  u = tf.random.stateless_uniform([2], seed, dtype=tf.float64)
  top = tf.cast(tf.floor(u[0] * tf.cast(tf.maximum(h - size, 0) + 1, tf.float64)), tf.int32)
  left = tf.cast(tf.floor(u[1] * tf.cast(tf.maximum(w - size, 0) + 1, tf.float64)), tf.int32)
  return top, left


def random_crop(image, labels, size: int, seeds, cat_max_ratio: float, ignore_index: int):
  """A size x size crop re-drawn (seeds[1:]) while one class dominates; mmseg's loop: the
  first acceptable of the first CROP_TRIES boxes, else the box after them."""
  h, w = tf.shape(labels)[0], tf.shape(labels)[1]

  def box(i):
    return _crop_box(h, w, size, seeds[i])

  def crop(x, b):
    return x[b[0]:b[0] + size, b[1]:b[1] + size]

  def acceptable(b):
    patch = tf.reshape(crop(labels, b), [-1])
    patch = tf.boolean_mask(patch, patch != ignore_index)
    _, _, counts = tf.unique_with_counts(patch)
    return (tf.size(counts) > 1) & (
        tf.cast(tf.reduce_max(tf.concat([counts, [0]], 0)), tf.float64)
        < cat_max_ratio * tf.cast(tf.reduce_sum(counts), tf.float64))

  if cat_max_ratio < 1.0:
    def cond(i, found):
      return (i < CROP_TRIES) & ~found

    def body(i, found):
      ok = acceptable(box(i))
      return tf.where(ok, i, i + 1), ok

    chosen, _ = tf.while_loop(cond, body, (tf.constant(0), tf.constant(False)))
    chosen = tf.minimum(chosen, CROP_TRIES)
    b = tf.switch_case(chosen, [lambda k=k: box(k) for k in range(CROP_TRIES + 1)])
  else:
    b = box(0)
  return crop(image, b), crop(labels, b)


def augment_pair(image, labels, seed, size: int, cfg) -> tuple:
  """Training transform of one (uint8 [H, W, 3], int32 [H, W]) pair, seeded by `seed` ([2]).

  Returns float32 [size, size, 3] in 0..255 (not yet normalised) with the ignore label
  where it was padded, and int32 [size, size] labels, both padded to size x size.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3 + CROP_TRIES + 1)
  lo, hi = (float(v) for v in cfg.scale_range)
  ratio = lo + (hi - lo) * tf.random.stateless_uniform([], seeds[0], dtype=tf.float64)
  shape = tf.shape(labels)
  hw = rescale_size(shape[0], shape[1], 4.0 * size * ratio, size * ratio)
  image, labels = _resize_pair(image, labels, hw, cfg.ignore_index)
  image, labels = random_crop(image, labels, size, seeds[3:], float(cfg.cat_max_ratio),
                              cfg.ignore_index)
  if cfg.flip:
    flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
    # tf.reverse: a negative-stride slice is TF's slow path (preprocess.flip_left_right).
    image, labels = tf.cond(flip, lambda: (tf.reverse(image, [1]), tf.reverse(labels, [1])),
                            lambda: (image, labels))
  return image, labels


def eval_pair(image, labels, size: int, ignore_index: int) -> tuple:
  """Evaluation transform: the longer side scaled to `size` (aspect kept), not padded yet."""
  shape = tf.shape(labels)
  longer = tf.cast(size, tf.float64)
  hw = rescale_size(shape[0], shape[1], longer, longer)
  hw = tf.minimum(hw, size)
  return _resize_pair(image, labels, hw, ignore_index)


# ----------------------------------------------------------------------------- the stream
def _element_fn(source, cfg, mode: str, size: int, seed: int):
  n = source.num_examples
  train = mode == 'train'
  base_seed = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  mean = tf.constant(cfg.mean, tf.float32) * 255.0
  std = tf.constant(cfg.std, tf.float32) * 255.0

  def transform(raw_image, raw_mask, position):
    image = seg_sources.decode_image(raw_image)
    labels = seg_sources.to_labels(seg_sources.decode_mask_channels(raw_mask), cfg.mask_channel,
                                   cfg.reduce_zero_label, cfg.ignore_index)
    tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(labels)[:2],
                              message='mask size differs from its image size')
    if train:
      seed_g = tf.random.experimental.stateless_fold_in(base_seed, position)
      image, labels = augment_pair(image, labels, seed_g, size, cfg)
    else:
      image, labels = eval_pair(image, labels, size, cfg.ignore_index)
    image = (image - mean) / std
    return _pad_pair(image, labels, size, cfg.ignore_index)

  def element(position, raw_image=None, raw_mask=None):
    def real():
      if source.load is not None:
        idx = pipeline.example_id(position, n, seed) if train else tf.minimum(position, n - 1)
        r_image, r_mask = source.load(idx)
      else:
        r_image, r_mask = raw_image, raw_mask
      return transform(r_image, r_mask, position)

    if train:
      image, labels = real()
      return {'image': image, 'mask': labels, 'index': position}
    valid = position < n
    image, labels = tf.cond(valid, real, lambda: (
        tf.zeros([size, size, 3], tf.float32),
        tf.fill([size, size], tf.constant(cfg.ignore_index, tf.int32))))
    return {'image': image, 'mask': labels, 'index': position, 'valid': valid}

  return tf.autograph.experimental.do_not_convert(element)


def _sequential(source, train: bool, seed: int, shuffle_buffer: int, start: int,
                padded_total: int) -> tf.data.Dataset:
  """(position, raw image, raw mask) from `start` on, for sources read in order."""
  n = source.num_examples
  records = source.records()
  if train:
    def epoch(e):
      return records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e,
                             reshuffle_each_iteration=False).enumerate(start=e * n)
    stream = tf.data.Dataset.range(start // n, 2**62).flat_map(epoch).skip(start % n)
  else:
    padding = tf.data.Dataset.range(n, padded_total).map(
        lambda g: (g, (tf.constant(b''), tf.constant(b''))))
    stream = records.enumerate().concatenate(padding).skip(start)
  return stream.map(lambda g, ex: (g, ex[0], ex[1]))


def create_dataset(dataset_cfg: Any, *, split: str, mode: str, global_batch_size: int,
                   image_size: int, seed: int, start_step: int = 0,
                   process_index: Optional[int] = None, process_count: Optional[int] = None
                   ) -> Iterator[Dict[str, np.ndarray]]:
  """This host's segmentation batches from step `start_step` on.

  Returns an iterator of dicts of NumPy arrays: 'image' float32 (B, S, S, 3) normalised,
  'mask' int32 (B, S, S) (the ignore label where padded or unlabelled), 'index' int64 (B,)
  global stream positions, and in 'eval' mode 'valid' bool (B,), False on the padding that
  completes the last batch ('train' repeats forever; 'eval' is one pass in order).
  """
  cfg = resolve_config(dataset_cfg)
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}: use one of {MODES}.')
  process_index, process_count, host_batch = pipeline.host_batch_size(
      global_batch_size, process_index, process_count)
  train = mode == 'train'
  source = seg_sources.open_source(cfg, split, image_size)
  n = source.num_examples
  num_steps = None if train else math.ceil(n / global_batch_size)
  element = _element_fn(source, cfg, mode, image_size, seed)
  if source.load is not None:
    stop = 2**62 if train else num_steps * host_batch
    ds = tf.data.Dataset.range(start_step * host_batch, max(stop, start_step * host_batch)).map(
        lambda i: (i // host_batch) * global_batch_size + process_index * host_batch
        + i % host_batch)
  else:
    ds = _sequential(source, train, seed, int(cfg.shuffle_buffer), start_step * global_batch_size,
                     (num_steps or 0) * global_batch_size)
    ds = ds.filter(lambda g, r, m: (g % global_batch_size) // host_batch == process_index)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(host_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def diagnose(step: int, error: Exception) -> Exception:
    return ValueError(f'Reading {source.describe} failed at batch {step}: '
                      f'{unreadable.op_error_text(error)}. Run with config.dataset.verify_masks='
                      'True to find the file, or check the dataset files.')

  return _Batches(ds, diagnose, start_step)


class _Batches:
  """NumPy batches; a decoding failure is re-raised as `diagnose` describes it."""

  def __init__(self, dataset: tf.data.Dataset, diagnose: Callable[[int, Exception], Exception],
               step: int):
    self._iterator = dataset.as_numpy_iterator()
    self._diagnose = diagnose
    self._step = step

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      raise self._diagnose(self._step, e) from e
    self._step += 1
    return batch
