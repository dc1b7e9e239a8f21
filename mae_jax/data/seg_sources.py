"""Where segmentation examples come from: synthetic scenes, a folder of image/mask files, TFDS.

A `SegSource` either has random access, `load(example_id) -> (raw image, raw mask)` as TF
ops, or is read in order, `records() -> tf.data.Dataset` of `(raw image, raw mask)`. A raw
image is encoded bytes or uint8 [H, W, 3]; a raw mask is encoded PNG bytes or uint8 [H, W].

- 'scenes': `mae_jax.data.scenes`, generated in memory (splits 'train', 'test').
- 'folder': the layout of ADE20K's release (ADEChallengeData2016) and mmsegmentation:
  `<data_dir>/images/<split>/<name>.jpg|jpeg|png` with `<data_dir>/annotations/<split>/
  <name>.png`, a single-channel PNG of class ids per image.
- 'tfds': a TFDS dataset with an image feature (`image_key`) and a mask image feature
  (`mask_key`); `mask_channel` picks the channel holding the class id of a multi-channel
  mask (TFDS's scene_parse150 stores the Places Challenge 2017 *instance* annotations:
  red = category, green = instance).

`verify` reads every mask of a split (and every image's size) before training and raises
naming the file for a mask whose size differs from its image, a class id outside the
label range, or a multi-channel mask where one channel was expected.
"""
import os
from typing import Optional, Tuple

import tensorflow as tf

from mae_jax.data import scenes as scenes_lib
from mae_jax.data import sources
from mae_jax.data.sources import scene_count

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
MASK_EXTENSION = '.png'
FOLDER_LAYOUT = ('<data_dir>/images/<split>/<name>.jpg|jpeg|png and '
                 '<data_dir>/annotations/<split>/<name>.png')


# A split: random access `load(id) -> (image, mask)` or ordered `records()`.
SegSource = sources.Source


# ----------------------------------------------------------------------------- scenes
def scene_size(cfg, image_size: int) -> int:
  return int(cfg.scene_size) if cfg.scene_size else int(image_size)


def scenes_source(cfg, split: str, image_size: int) -> SegSource:
  images, masks = scenes_lib.generate(split, scene_count(cfg, split), scene_size(cfg, image_size),
                                      int(cfg.scenes_seed))
  image_table, mask_table = tf.constant(images), tf.constant(masks)

  def load(idx):
    return tf.gather(image_table, idx), tf.gather(mask_table, idx)

  return SegSource(len(images), f'synthetic scenes ({split})', load=load,
                   example_name=lambda i: f'synthetic scene {i} of {split!r}')


# ----------------------------------------------------------------------------- folder
def folder_pairs(data_dir: str, split: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(image paths, mask paths) of a split, sorted by name; raises naming any image without
  its mask file."""
  if not data_dir:
    raise ValueError(f'config.dataset.data_dir is empty: point it at the root of {FOLDER_LAYOUT} '
                     '(e.g. the unpacked ADEChallengeData2016).')
  root = os.path.expanduser(data_dir)
  image_dir = os.path.join(root, 'images', split)
  mask_dir = os.path.join(root, 'annotations', split)
  for folder in (image_dir, mask_dir):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'{folder!r} does not exist: the folder source expects '
                              f'{FOLDER_LAYOUT}; set config.dataset.data_dir and '
                              'train_split/eval_split (e.g. training / validation).')
  with os.scandir(image_dir) as entries:
    names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith('.')
                   and e.name.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ValueError(f'{image_dir!r} holds no images ({IMAGE_EXTENSIONS}).')
  images, masks = [], []
  for name in names:
    mask = os.path.join(mask_dir, os.path.splitext(name)[0] + MASK_EXTENSION)
    if not os.path.isfile(mask):
      raise FileNotFoundError(f'The mask of image {os.path.join(image_dir, name)!r} is missing: '
                              f'expected {mask!r}. Add it, or remove the image.')
    images.append(os.path.join(image_dir, name))
    masks.append(mask)
  return tuple(images), tuple(masks)


def folder_source(cfg, split: str) -> SegSource:
  images, masks = folder_pairs(cfg.data_dir, split)
  image_table, mask_table = tf.constant(images), tf.constant(masks)

  def load(idx):
    return (tf.io.read_file(tf.gather(image_table, idx)),
            tf.io.read_file(tf.gather(mask_table, idx)))

  return SegSource(len(images), f'folder {os.path.join(cfg.data_dir, "images", split)!r}',
                   load=load,
                   example_name=lambda i: f'image {images[i]!r} with mask {masks[i]!r}')


# ----------------------------------------------------------------------------- TFDS
def tfds_source(cfg, split: str) -> SegSource:
  return sources.tfds_pairs(cfg, split, 'mask_key', second_is_image=True,
                            records_order=' (in file order)')


def open_source(cfg, split: str, image_size: int) -> SegSource:
  """The `split` of the dataset a resolved segmentation `config.dataset` names."""
  if cfg.source == 'scenes':
    return scenes_source(cfg, split, image_size)
  if cfg.source == 'folder':
    return folder_source(cfg, split)
  return tfds_source(cfg, split)


# ----------------------------------------------------------------------------- decoding
def decode_image(raw: tf.Tensor) -> tf.Tensor:
  """Encoded bytes or uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  if raw.dtype != tf.string:
    return raw
  image = tf.io.decode_image(raw, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def image_hw(raw: tf.Tensor) -> tf.Tensor:
  """[2] int32 height, width; JPEG sizes come from the header, without decoding."""
  if raw.dtype != tf.string:
    return tf.shape(raw, out_type=tf.int32)[:2]
  return tf.cond(tf.io.is_jpeg(raw),
                 lambda: tf.image.extract_jpeg_shape(raw, output_type=tf.int32)[:2],
                 lambda: tf.shape(decode_image(raw), out_type=tf.int32)[:2])


def decode_mask_channels(raw: tf.Tensor) -> tf.Tensor:
  """PNG bytes or uint8 [H, W] -> [H, W, C] int32 with the channels as stored (16-bit too)."""
  if raw.dtype != tf.string:
    mask = tf.cast(raw, tf.int32)
    return mask[..., None] if mask.shape.rank == 2 else mask
  # decode_png(dtype=uint16) scales 8-bit values by 257: read the IHDR bit depth first.
  depth = tf.io.decode_raw(tf.strings.substr(raw, 24, 1), tf.uint8)[0]
  return tf.cond(depth == 16,
                 lambda: tf.cast(tf.io.decode_png(raw, channels=0, dtype=tf.uint16), tf.int32),
                 lambda: tf.cast(tf.io.decode_png(raw, channels=0, dtype=tf.uint8), tf.int32))


def to_labels(channels: tf.Tensor, mask_channel: Optional[int], reduce_zero_label: bool,
              ignore_index: int) -> tf.Tensor:
  """[H, W, C] stored ids -> [H, W] int32 labels (mmseg's reduce_zero_label: 0 -> ignore,
  k -> k - 1, the ignore id stays)."""
  labels = channels[..., 0 if mask_channel is None else mask_channel]
  if reduce_zero_label:
    labels = tf.where(labels == 0, ignore_index,
                      tf.where(labels == ignore_index, ignore_index, labels - 1))
  return labels


def verify(source: SegSource, cfg, num_classes: int, *, max_examples: Optional[int] = None
           ) -> None:
  """Reads every (or the first `max_examples`) example's image size and mask; raises a
  ValueError naming the example's file(s) for: a mask whose size differs from its image,
  a mask with several channels where `mask_channel` is None, or a class id outside
  [0, num_classes) that is not the ignore label."""
  n = source.num_examples if max_examples is None else min(max_examples, source.num_examples)

  def stats(raw_image, raw_mask):
    channels = decode_mask_channels(raw_mask)
    labels = to_labels(channels, cfg.mask_channel, cfg.reduce_zero_label, cfg.ignore_index)
    bad = (labels != cfg.ignore_index) & ((labels < 0) | (labels >= num_classes))
    first_bad = tf.cond(tf.reduce_any(bad), lambda: tf.boolean_mask(labels, bad)[0],
                        lambda: tf.constant(-1, tf.int32))
    return (image_hw(raw_image), tf.shape(channels, out_type=tf.int32), tf.reduce_any(bad),
            first_bad)

  if source.load is not None:
    ds = tf.data.Dataset.range(n).map(lambda i: stats(*source.load(i)),
                                      num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = source.records().take(n).map(stats, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  index = 0
  try:
    for image_shape, mask_shape, has_bad, first_bad in ds.with_options(options).as_numpy_iterator():
      name = source.example_name(index)
      image_hw_, (mask_h, mask_w, mask_c) = tuple(map(int, image_shape)), map(int, mask_shape)
      if image_hw_ != (mask_h, mask_w):
        raise ValueError(f'Mask size {(mask_h, mask_w)} differs from its image size '
                         f'{image_hw_}: {name}. Fix: give the mask the image\'s size '
                         '(one class id per image pixel).')
      if cfg.mask_channel is not None and not 0 <= cfg.mask_channel < mask_c:
        raise ValueError(f'config.dataset.mask_channel={cfg.mask_channel} but the mask of {name} '
                         f'has {mask_c} channel(s).')
      if cfg.mask_channel is None and mask_c != 1:
        raise ValueError(f'The mask of {name} has {mask_c} channels; masks must be '
                         'single-channel PNGs of class ids (a palette PNG decodes to RGB: save '
                         'its indices as a grayscale "L" image), or set '
                         'config.dataset.mask_channel to the channel holding the class id.')
      if has_bad:
        shift = ' after reduce_zero_label (stored id - 1)' if cfg.reduce_zero_label else ''
        raise ValueError(
            f'Class id {int(first_bad)}{shift} is outside [0, {num_classes}) and is not the '
            f'ignore label {cfg.ignore_index}: {name}. Fix: set config.num_classes to the '
            'number of classes, config.dataset.reduce_zero_label / ignore_index to the '
            "dataset's convention, or correct the mask.")
      index += 1
  except tf.errors.OpError as e:
    raise ValueError(f'Cannot read {source.example_name(index)}: '
                     f'{str(getattr(e, "message", e)).splitlines()[0]}. Fix: replace or remove '
                     'it (images JPEG or PNG, masks PNG).') from e
