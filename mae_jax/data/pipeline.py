"""Input pipeline: TFDS, ImageFolder or embedded photos -> deterministic host-local batches.

The stream: global batch `s` holds the examples at global stream positions
`g = s * global_batch + j`, `j < global_batch`; host `h` of `P` takes the contiguous slice
`j in [h * host_batch, (h + 1) * host_batch)`. For training modes, position `g` shows example
`perm_e[g % N]` of epoch `e = g // N`, where `perm_e` is a pseudo-random permutation seeded by
`(seed, e)` (computed per index with `tf.random.experimental.index_shuffle`, never
materialised), and its augmentation is drawn from stateless ops seeded by `(seed, g)`. Batches
therefore depend on neither the host nor the device count, and `start_step=k` computes where
step `k` starts instead of decoding and discarding the steps before it.

Sources with random access (ImageFolder, embedded photos, TFDS datasets stored as array_record)
follow that scheme exactly. TFDS datasets stored only as TFRecord files are read sequentially:
each epoch is the file-order stream shuffled by a buffer seeded by `(seed, e)`; every host reads
every record and keeps its slice before decoding (reading costs scale with the host count), and
resuming reads and drops the records before `start_step` within the epoch (no decoding). Prepare
big datasets with `tfds build --file_format=array_record` to get random access.

Unreadable images (`config.dataset.bad_images`): 'error' stops naming the file. 'skip' (random
access only) replaces each unreadable training example by the first readable one among
`unreadable.MAX_REPLACEMENTS` (8) candidates, the examples that follow it in its epoch's
permutation (fixed by the seed and the stream position, so a resumed run sees the same
replacement), and drops unreadable evaluation examples (`valid` False). Only the examples found
unreadable so far take that slower path (`mae_jax.data.unreadable`).
"""
import functools
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from mae_jax.data import preprocess
from mae_jax.data import sources
from mae_jax.data import unreadable

# The pipeline runs on the host CPU; TF must never grab accelerator memory that JAX needs.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # Already initialised (e.g. by the caller): leave it.
  pass

SOURCES = ('tfds', 'imagefolder', 'embedded', 'scenes')
MODES = ('pretrain', 'linear_probe', 'finetune', 'eval')
TFDS_READ_MODES = ('auto', 'random_access', 'sequential')
BAD_IMAGES = ('error', 'skip')
_AUGMENT_SALT = 0x6d6165  # separates the augmentation seeds from the permutation seeds


def default_dataset_config() -> ml_collections.ConfigDict:
  """All `config.dataset` fields with their defaults; configs start from this.

  source: 'embedded' (photos shipped with scikit-image, no download), 'imagefolder'
    (`data_dir/<split>/<class>/*.jpg|jpeg|png`, classes sorted -> label ids) or 'tfds'.
  name: TFDS name (with optional config/version), e.g. 'imagenet2012', 'cifar10'.
  data_dir: ImageFolder root, or the TFDS data_dir (None: TFDS's default).
  manual_dir: TFDS manual-download directory (imagenet2012: the two ILSVRC2012 tars).
  download: let TFDS download and prepare the dataset (the only network access).
  train_split / eval_split: TFDS split strings ('train', 'validation', 'train[:90%]'), or
    ImageFolder subdirectory names; the embedded set has 'train' (whole photos) and 'test'
    (each photo cut into an `embedded_eval_grid` x `embedded_eval_grid` grid of tiles).
  image_key / label_key: TFDS feature names.
  mean / std: normalisation, in 0..1 units.
  crop_scale: RandomResizedCrop area range in 'pretrain' mode (the paper: 0.2-1).
  downstream_crop_scale: the same for 'linear_probe' and 'finetune' (0.08-1).
  crop_ratio: aspect-ratio range of RandomResizedCrop.
  eval_crop_fraction: 'eval' resizes the shorter side to int(image_size / this) (256 for 224).
  rand_augment_*, random_erase_prob: 'finetune' mode (timm's rand-m9-mstd0.5-inc1, reprob 0.25).
  tfds_read: 'auto' (random access when the dataset is stored as array_record), or force
    'random_access' / 'sequential'.
  shuffle_buffer: per-epoch shuffle buffer of sequential TFDS reading.
  embedded_eval_grid: tiles per side of the embedded 'test' split.
  bad_images: what an unreadable image does: 'error' stops with a message naming it; 'skip'
    replaces it (training; deterministically, so resuming stays exact) or drops it
    (evaluation), logs its name and counts it. Needs random access. Valid images in any
    colour mode (grey, RGBA, palette, 16 bit, CMYK) and a PNG named .jpg are decoded either way.
  scenes_train / scenes_eval / scene_size / scenes_seed: source 'scenes' (mae_jax.data.scenes
    as images, label = the largest shape's kind): scenes per split, pixels (0: output size), seed.
  """
  return ml_collections.ConfigDict(dict(
      source='embedded', name='', data_dir='', manual_dir='', download=False,
      train_split='train', eval_split='test', image_key='image', label_key='label',
      mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD,
      crop_scale=(0.2, 1.0), downstream_crop_scale=(0.08, 1.0),
      crop_ratio=preprocess.CROP_RATIO, eval_crop_fraction=0.875,
      rand_augment_num_ops=2, rand_augment_magnitude=9, rand_augment_magnitude_std=0.5,
      random_erase_prob=0.25, tfds_read='auto', shuffle_buffer=16384, embedded_eval_grid=3,
      bad_images='error', scenes_train=512, scenes_eval=128, scene_size=0, scenes_seed=0))


def _resolve_config(dataset_cfg: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with `dataset_cfg`; rejects unknown fields and unknown sources."""
  cfg = default_dataset_config()
  given = dict(dataset_cfg.items()) if dataset_cfg is not None else {}
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f'Unknown dataset config field(s) {unknown}; known fields: {sorted(cfg)} '
                     '(see mae_jax.data.pipeline.default_dataset_config).')
  for key, value in given.items():
    cfg[key] = value
  if cfg.source not in SOURCES:
    raise ValueError(f'Unknown dataset source {cfg.source!r}: set config.dataset.source to one '
                     f'of {SOURCES}.')
  if cfg.tfds_read not in TFDS_READ_MODES:
    raise ValueError(f'Unknown tfds_read {cfg.tfds_read!r}: use one of {TFDS_READ_MODES}.')
  if cfg.bad_images not in BAD_IMAGES:
    raise ValueError(f'Unknown bad_images {cfg.bad_images!r}: set config.dataset.bad_images to '
                     f'one of {BAD_IMAGES}.')
  return cfg


# ----------------------------------------------------------------------------- public metadata
def num_examples(dataset_cfg: Any, split: str) -> int:
  """Number of examples in `split` (before any padding or repetition)."""
  return sources.split_size(_resolve_config(dataset_cfg), split)


def num_classes(dataset_cfg: Any) -> int:
  """Number of label classes (embedded: one per photo; ImageFolder: train split's class dirs)."""
  return sources.class_count(_resolve_config(dataset_cfg))


# ----------------------------------------------------------------------------- the stream
def example_id(position: tf.Tensor, n: int, seed: int) -> tf.Tensor:
  """Example shown at a training stream position: `perm_epoch[position % n]`."""
  if n == 1:
    return tf.zeros_like(position)
  seed = seed if isinstance(seed, tf.Tensor) else tf.constant(seed, tf.int64)
  epoch_seed = tf.stack([seed, position // n])
  return tf.random.experimental.index_shuffle(position % n, epoch_seed,
                                              tf.constant(n - 1, tf.int64))


def _host_positions(step: int, global_batch: int, host_batch: int, process_index: int):
  """Global stream positions of this host's share of global batch `step`."""
  first = step * global_batch + process_index * host_batch
  return range(first, first + host_batch)


def _augment_module():
  try:
    from mae_jax.data import randaugment  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("mode='finetune' needs mae_jax/randaugment.py (rand_augment, random_erase), "
                      f'which failed to import ({e}); use mode=\'linear_probe\' meanwhile.') from e
  return randaugment


def _example_transform(cfg, mode: str, image_size: int, seed: int):
  """(raw image, stream position) -> uint8 [S, S, 3], or normalised float32 in 'finetune'."""
  if mode == 'eval':
    return lambda raw, position: preprocess.resize_and_centre_crop(
        raw, image_size, cfg.eval_crop_fraction)
  scale = tuple(cfg.crop_scale if mode == 'pretrain' else cfg.downstream_crop_scale)
  ratio = tuple(cfg.crop_ratio)
  augment = _augment_module() if mode == 'finetune' else None
  base_seed = tf.constant([seed, _AUGMENT_SALT], tf.int64)

  def transform(raw, position):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base_seed, position), 4)
    image = preprocess.random_resized_crop(raw, seeds[0], image_size, scale, ratio)
    image = preprocess.flip_left_right(image, seeds[1])
    if augment is not None:  # timm order: crop, flip, RandAugment, normalise, erase.
      image = augment.rand_augment(image, seeds[2], num_ops=cfg.rand_augment_num_ops,
                                   magnitude=cfg.rand_augment_magnitude,
                                   magnitude_std=cfg.rand_augment_magnitude_std)
      image = preprocess.normalize(image, cfg.mean, cfg.std)
      image = augment.random_erase(image, seeds[3], probability=cfg.random_erase_prob)
    return image

  return transform


def _element_fn(transform, load, n: int, image_size: int, train: bool, seed: int):
  """Builds `(position[, raw, label]) -> example dict`; eval positions >= n are padding.

  `example` (random access): read that example instead of the one at `position`.
  """
  def element(position, raw=None, label=None, example=None):
    def real():
      if load is None:
        r, l = raw, label
      elif example is not None:
        r, l = load(example)
      else:
        r, l = load(example_id(position, n, seed) if train else tf.minimum(position, n - 1))
      return transform(r, position), tf.cast(l, tf.int32)

    if train:
      image, lab = real()
      return {'image': image, 'label': lab, 'index': position}
    valid = position < n
    image, lab = tf.cond(valid, real, lambda: (tf.zeros([image_size, image_size, 3], tf.uint8),
                                               tf.constant(-1, tf.int32)))
    return {'image': image, 'label': lab, 'index': position, 'valid': valid}

  return tf.autograph.experimental.do_not_convert(element)


def _candidate_id(position: tf.Tensor, k: tf.Tensor, n: int, seed: int) -> tf.Tensor:
  """Training example tried at `position` after `k` unreadable ones: the one `k` places later
  in the same epoch's permutation, wrapping (k = 0: the stream's own). So the first `n`
  candidates of a position are distinct examples, whatever the seed."""
  epoch_start = (position // n) * n
  return example_id(epoch_start + (position % n + k) % n, n, seed)


def _example_at(position: int, *, n: int, train: bool, seed: int) -> Optional[int]:
  """The example id at a stream position (eval padding: None), computed eagerly."""
  if not train:
    return position if position < n else None
  return int(example_id(tf.constant(position, tf.int64), n, seed))


def _examples_tried(position: int, k: int, *, n: int, train: bool, seed: int) -> List[int]:
  """The ids of the first `k` candidates at a stream position (eval: the example itself)."""
  if not train:
    return [min(position, n - 1)]
  p = tf.constant(position, tf.int64)
  return [int(_candidate_id(p, tf.constant(j, tf.int64), n, seed)) for j in range(k)]


def _sequential_records(source: sources.Source, *, train: bool, seed: int,
                        shuffle_buffer: int, start: int, padded_total: int) -> tf.data.Dataset:
  """(position, raw, label) from `start` on, for sources without random access."""
  n = source.num_examples
  records = source.records()
  if train:
    seed_t = tf.constant(seed, tf.int64)

    def epoch(e):
      shuffled = records.shuffle(shuffle_buffer, seed=seed_t * 1_000_003 + e,
                                 reshuffle_each_iteration=False)
      return shuffled.enumerate(start=e * n)

    stream = tf.data.Dataset.range(start // n, 2**62).flat_map(epoch).skip(start % n)
  else:
    padding = tf.data.Dataset.range(n, padded_total).map(
        lambda g: (g, (tf.constant(b''), tf.constant(-1, tf.int64))))
    stream = records.map(lambda r, l: (r, tf.cast(l, tf.int64))).enumerate().concatenate(
        padding).skip(start)
  return stream.map(lambda g, ex: (g, ex[0], ex[1]))


def _finalize_fn(cfg):
  """Batch -> batch with uint8 images normalised by the dataset mean/std."""
  mean, std = tuple(cfg.mean), tuple(cfg.std)

  def finalize(batch):
    if batch['image'].dtype == tf.uint8:
      batch['image'] = preprocess.normalize(batch['image'], mean, std)
    return batch

  return finalize


def host_batch_size(global_batch_size: int, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> Tuple[int, int, int]:
  """(process_index, process_count, this host's batch): JAX's process by default, checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'The global batch size {global_batch_size} must be a positive multiple of '
                     f'the process count {process_count}: change config.batch_size.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count}).')
  return process_index, process_count, global_batch_size // process_count


def create_dataset(dataset_cfg: Any, *, split: str, mode: str, global_batch_size: int,
                   image_size: int, seed: int, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """This host's batches of the global stream, from step `start_step` on.

  Args:
    dataset_cfg: `config.dataset` (fields of `default_dataset_config()`).
    split: split name (TFDS split string, ImageFolder subdirectory, embedded 'train'/'test').
    mode: 'pretrain' | 'linear_probe' | 'finetune' (shuffled, augmented, repeats forever) or
      'eval' (resize + centre crop, one pass in order, last batch padded).
    global_batch_size: batch over all hosts; each host yields `global_batch_size // P`.
    image_size: output height and width.
    seed: seed of the epoch permutations and the augmentation.
    start_step: the first batch yielded is batch `start_step` of an uninterrupted run.
    process_index, process_count: this host and the host count (default: from JAX).

  Returns:
    An iterator of dicts of NumPy arrays: 'image' float32 (B, S, S, 3) normalised,
    'label' int32 (B,) (-1 on padding), 'index' int64 (B,) global stream positions, and in
    'eval' mode 'valid' bool (B,), False on the padding that completes the last batch.
  """
  cfg = _resolve_config(dataset_cfg)
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}: use one of {MODES}.')
  process_index, process_count, host_batch = host_batch_size(global_batch_size, process_index,
                                                             process_count)
  if image_size <= 0 or start_step < 0:
    raise ValueError(f'image_size ({image_size}) must be positive and start_step ({start_step}) '
                     'non-negative.')
  train = mode != 'eval'
  transform = _example_transform(cfg, mode, image_size, seed)
  source = sources.open_source(cfg, split, image_size)
  skip = cfg.bad_images == 'skip'
  if skip and source.load is None:
    raise ValueError(f"config.dataset.bad_images='skip' needs random access, which "
                     f'{source.describe} (TFRecord files) lacks: prepare it with `tfds build '
                     f"--file_format=array_record`, or set bad_images='error'.")
  n = source.num_examples
  num_steps = None if train else -(-n // global_batch_size)
  element = _element_fn(transform, source.load, n, image_size, train, seed)
  mean, std = tuple(cfg.mean), tuple(cfg.std)
  finalize = _finalize_fn(cfg)

  if train:
    example_of = lambda position: example_id(position, n, seed)
    candidate = lambda position, k: _candidate_id(position, k, n, seed)
  else:
    example_of = lambda position: tf.minimum(position, n - 1)
    candidate = lambda position, k: example_of(position)

  def build(first_step: int, suspects: FrozenSet[int], stand_in: int) -> tf.data.Dataset:
    """The batches from `first_step` on; positions whose example is in `suspects` hold
    example `stand_in`, flagged 'suspect', which `unreadable.BatchIterator` replaces."""
    if source.load is not None:
      # Host-local index i -> global position of this host's slice of batch i // host_batch.
      stop = 2**62 if train else num_steps * host_batch
      positions = tf.data.Dataset.range(first_step * host_batch,
                                        max(stop, first_step * host_batch)).map(
          lambda i: (i // host_batch) * global_batch_size + process_index * host_batch
          + i % host_batch)
      if suspects:
        read = unreadable.flag_suspects(element, suspects, stand_in, example_of,
                                        None if train else n)
      else:
        read = element
      ds = positions.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    else:
      ds = _sequential_records(source, train=train, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
                               start=first_step * global_batch_size,
                               padded_total=(num_steps or 0) * global_batch_size)
      # Keep this host's slice before decoding anything.
      ds = ds.filter(lambda g, r, l: (g % global_batch_size) // host_batch == process_index)
      ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(host_batch, drop_remainder=True).map(finalize,
                                                       num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  positions = functools.partial(_host_positions, global_batch=global_batch_size,
                                host_batch=host_batch, process_index=process_index)
  example_at = functools.partial(_example_at, n=n, train=train, seed=seed)
  tried = functools.partial(_examples_tried, n=n, train=train, seed=seed)
  tries = unreadable.MAX_REPLACEMENTS if train else 1
  return unreadable.BatchIterator(
      build, unreadable.diagnose_fn(source, positions, example_at), start_step, skip,
      find_suspects=unreadable.suspects_fn(source, positions, example_at, tried, tries),
      resolve=unreadable.resolver(transform, source.load, candidate, mean, std), tries=tries,
      name_bad=unreadable.bad_namer(source, tried))


# ----------------------------------------------------------------------------- chosen examples
# Sequential sources (TFDS TFRecord) spread over their first records only: a few images
# should not read through a whole split. TFDS shuffles examples when it prepares a dataset,
# so these records are not one class.
SEQUENTIAL_SPREAD = 4096
_SPREAD_SALT = 0x737072  # separates the spread's seed from the permutation seeds


def spread_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
  """`count` sorted, distinct example indices spread evenly over `[0, num_examples)`.

  Index k is `floor((k + u) * num_examples / count)` with one offset `u` in [0, 1) drawn
  from `seed` alone: the same indices in every run and resume, one in each of `count`
  equal stretches, `num_examples / count` apart. On a split sorted by class (an
  ImageFolder) with equal classes, at least `count` of them, every pick is from another
  class (CIFAR-10's test split: 8 of its 10 classes).
  """
  if not 0 < count <= num_examples:
    raise ValueError(f'Cannot spread {count} examples over a split of {num_examples}: ask for '
                     f'between 1 and {num_examples}.')
  u = np.random.default_rng([seed, _SPREAD_SALT]).random()
  picks = np.floor((np.arange(count) + u) * (num_examples / count)).astype(np.int64)
  return np.minimum(picks, num_examples - 1)


def load_examples(dataset_cfg: Any, *, split: str, indices, image_size: int
                  ) -> Dict[str, np.ndarray]:
  """The examples at `indices` of `split`, as 'eval' mode shows them, in the order given.

  Only those examples are decoded. Random-access sources read just them; sequential ones
  (TFDS TFRecord) read, without decoding, the records up to the largest index.

  Returns:
    {'image': float32 (K, S, S, 3) normalised, 'label': int32 (K,), 'index': int64 (K,)}.
  """
  cfg = _resolve_config(dataset_cfg)
  return _load_examples(cfg, sources.open_source(cfg, split, image_size), indices, image_size)


def spread_examples(dataset_cfg: Any, *, split: str, count: int, image_size: int, seed: int
                    ) -> Dict[str, np.ndarray]:
  """`count` examples of `split` at `spread_indices` (fewer if the split is smaller).

  The spread covers the whole split of random-access sources and the first
  `SEQUENTIAL_SPREAD` records of sequential ones. Returns what `load_examples` returns.
  """
  cfg = _resolve_config(dataset_cfg)
  source = sources.open_source(cfg, split, image_size)
  span = source.num_examples if source.load is not None else min(source.num_examples,
                                                                 SEQUENTIAL_SPREAD)
  indices = spread_indices(span, min(count, span), seed)
  return _load_examples(cfg, source, indices, image_size)


def _load_examples(cfg, source: sources.Source, indices, image_size: int
                   ) -> Dict[str, np.ndarray]:
  indices = np.asarray(indices, np.int64).reshape(-1)
  n = source.num_examples
  if not len(indices) or indices.min() < 0 or indices.max() >= n:
    raise ValueError(f'Example indices {indices.tolist()[:10]} must be in [0, {n}) for '
                     f'{source.describe}, and at least one.')
  unique = np.unique(indices)
  transform = _example_transform(cfg, 'eval', image_size, seed=0)
  element = _element_fn(transform, source.load, n, image_size, train=False, seed=0)
  if source.load is not None:
    ds = tf.data.Dataset.from_tensor_slices(unique).map(element)
  else:
    wanted = tf.constant(unique)
    ds = _sequential_records(source, train=False, seed=0, shuffle_buffer=1, start=0,
                             padded_total=0).take(int(unique[-1]) + 1)
    ds = ds.filter(lambda g, raw, label: tf.reduce_any(tf.equal(g, wanted))).map(element)
  ds = ds.batch(len(unique)).map(_finalize_fn(cfg))
  try:
    batch = next(ds.as_numpy_iterator())
  except tf.errors.OpError as e:
    diagnose = unreadable.diagnose_fn(source, lambda _: unique.tolist(), lambda i: i)
    raise diagnose(0, e) from e
  order = np.searchsorted(unique, indices)
  return {k: batch[k][order] for k in ('image', 'label', 'index')}


def eval_examples(dataset_cfg: Any, *, split: str, indices: np.ndarray, image_size: int,
                  batch_size: int = 256) -> Dict[str, np.ndarray]:
  """The examples at `indices` of `split` with the eval transform (resize, centre crop).

  For small fixed sets read once and kept (the k-NN monitor of pretraining). Returns, in
  the order of `indices`: 'image' uint8 (M, S, S, 3) (not normalised: `normalize_images`),
  'label' int32 (M,), 'index' int64 (M,). Every host reads all of them.
  """
  cfg = _resolve_config(dataset_cfg)
  source = sources.open_source(cfg, split, image_size)
  n = source.num_examples
  indices = np.asarray(indices, np.int64).reshape(-1)
  if len(indices) and (indices.min() < 0 or indices.max() >= n):
    raise ValueError(f'Example indices outside [0, {n}) of {source.describe}.')
  crop = lambda raw: preprocess.resize_and_centre_crop(raw, image_size, cfg.eval_crop_fraction)
  wanted = np.unique(indices)
  if source.load is not None:
    ds = tf.data.Dataset.from_tensor_slices(wanted).map(
        lambda i: (i,) + tuple(source.load(i)), num_parallel_calls=tf.data.AUTOTUNE)
  else:  # sequential: read up to the last wanted record, keep the wanted ones undecoded
    table = tf.constant(wanted)
    last = int(wanted[-1]) if len(wanted) else -1

    def keep(g, *unused_raw_and_label):
      pos = tf.minimum(tf.searchsorted(table, g[None])[0], len(wanted) - 1)
      return tf.equal(table[pos], g)

    ds = source.records().enumerate().take(last + 1).map(
        lambda g, ex: (g, ex[0], ex[1])).filter(keep)
  ds = ds.map(lambda i, raw, label: {'image': crop(raw), 'label': tf.cast(label, tf.int32),
                                     'index': i},
              num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
  options = tf.data.Options()
  options.deterministic = True
  try:
    parts = list(ds.with_options(options).as_numpy_iterator())
  except tf.errors.OpError as e:
    raise ValueError(f'Cannot read the chosen examples of {source.describe}: '
                     f'{unreadable.op_error_text(e)}.\nFix: replace or delete unreadable '
                     'images.') from e
  if not parts:
    return {'image': np.zeros((0, image_size, image_size, 3), np.uint8),
            'label': np.zeros((0,), np.int32), 'index': np.zeros((0,), np.int64)}
  got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.searchsorted(got['index'], indices)  # `wanted` came back sorted
  return {k: v[order] for k, v in got.items()}


def normalize_images(images: np.ndarray, dataset_cfg: Any) -> np.ndarray:
  """uint8 images -> float32 normalised with the dataset's mean and std, as batches are."""
  cfg = _resolve_config(dataset_cfg)
  mean, inv_std = preprocess.normalization_constants(cfg.mean, cfg.std)
  return (np.asarray(images, np.float32) - mean) * inv_std
