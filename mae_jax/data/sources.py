"""Dataset sources with a split's size and how to read it: ImageFolder, embedded photos, TFDS,
and the synthetic segmentation scenes (mae_jax.data.scenes) as labelled images.

A `Source` either has random access, `load(example_id) -> (raw, label)` as TF ops, or is read
sequentially, `records() -> tf.data.Dataset` of `(raw, label)` in a fixed order. A raw image
is encoded bytes (tf.string) or a decoded uint8 [H, W, 3] tensor (see mae_jax.data.preprocess).
Problems with the data (missing directories, empty folders, unprepared TFDS datasets, unknown
splits) raise here, before any image is read.
"""
import functools
import os
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Colour photos that ship inside scikit-image's wheel (no download); label = position here.
EMBEDDED_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle', 'retina',
                   'hubble_deep_field', 'immunohistochemistry')
EMBEDDED_SPLITS = ('train', 'test')


class Source(NamedTuple):
  """A split of a dataset. Random access: `load(example_id) -> (raw, label)` as TF ops;
  sequential: `records() -> tf.data.Dataset` of `(raw, label)` in a fixed order. Segmentation
  uses it with the encoded mask as the second element."""
  num_examples: int
  describe: str
  load: Optional[Callable[[tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]] = None
  records: Optional[Callable[[], tf.data.Dataset]] = None
  example_name: Callable[[int], str] = str


# ----------------------------------------------------------------------------- ImageFolder
_LAYOUT = 'expected layout: <data_dir>/<split>/<class_name>/<image>.jpg|jpeg|png'


def _class_dirs(split_dir: str):
  with os.scandir(split_dir) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))


@functools.lru_cache(maxsize=16)
def _image_folder_split(root: str, split: str, train_split: str):
  """(class names, sorted paths, labels) of one split; labels follow the train split's classes."""
  if not root:
    raise ValueError('config.dataset.data_dir is empty: point it at the ImageFolder root '
                     f'({_LAYOUT}).')
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'ImageFolder root {root!r} does not exist: set '
                            f'config.dataset.data_dir to an existing directory ({_LAYOUT}).')
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    found = _class_dirs(root)
    raise FileNotFoundError(f'ImageFolder split directory {split_dir!r} does not exist (found '
                            f'{found[:10]}): set config.dataset.train_split/eval_split to one of '
                            f'them ({_LAYOUT}).')
  train_dir = os.path.join(root, train_split)
  classes = _class_dirs(train_dir if os.path.isdir(train_dir) else split_dir)
  if not classes:
    raise ValueError(f'ImageFolder {split_dir!r} has no class subdirectories ({_LAYOUT}).')
  label_of = {name: i for i, name in enumerate(classes)}
  paths, labels, empty = [], [], []
  for name in _class_dirs(split_dir):
    if name not in label_of:
      raise ValueError(f'Class directory {os.path.join(split_dir, name)!r} is not among the '
                       f'{train_split!r} split classes {classes[:10]}...: make the splits hold '
                       'the same class directories.')
    class_dir = os.path.join(split_dir, name)
    with os.scandir(class_dir) as entries:
      files = sorted(e.name for e in entries
                     if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith('.'))
    if not files:
      empty.append(class_dir)
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([label_of[name]] * len(files))
  if not paths:
    raise ValueError(f'ImageFolder split {split_dir!r} holds no images with extensions '
                     f'{IMAGE_EXTENSIONS} ({_LAYOUT}).')
  if empty:
    raise ValueError(f'ImageFolder class directories without images {empty[:5]}: add images '
                     f'({IMAGE_EXTENSIONS}) or remove these directories.')
  return tuple(classes), tuple(paths), np.asarray(labels, np.int32)


def _image_folder_source(cfg, split: str) -> Source:
  _, paths, labels = _image_folder_split(cfg.data_dir, split, cfg.train_split)
  path_table = tf.constant(paths)
  label_table = tf.constant(labels)

  def load(idx):
    return tf.io.read_file(tf.gather(path_table, idx)), tf.gather(label_table, idx)

  return Source(len(paths), f'ImageFolder {os.path.join(cfg.data_dir, split)!r}', load=load,
                 example_name=lambda i: f'image file {paths[i]!r}')


# ----------------------------------------------------------------------------- embedded photos
def _load_photo(name: str) -> np.ndarray:
  from skimage import data  # pylint: disable=g-import-not-at-top
  if name == 'motorcycle':
    return data.stereo_motorcycle()[0]
  return getattr(data, name)()


@functools.lru_cache(maxsize=4)
def _embedded_photos(short_side: int) -> Tuple[np.ndarray, np.ndarray]:
  """The photos resized (bicubic) so the shorter side is at most `short_side`, zero-padded
  into one (K, H, W, 3) uint8 array, with their (K, 2) sizes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = []
  for name in EMBEDDED_PHOTOS:
    photo = Image.fromarray(_load_photo(name)).convert('RGB')
    factor = short_side / min(photo.size)
    if factor < 1:
      photo = photo.resize((round(photo.width * factor), round(photo.height * factor)),
                           Image.BICUBIC)
    photos.append(np.asarray(photo))
  sizes = np.array([p.shape[:2] for p in photos], np.int32)
  padded = np.zeros((len(photos), *sizes.max(0), 3), np.uint8)
  for i, p in enumerate(photos):
    padded[i, :p.shape[0], :p.shape[1]] = p
  return padded, sizes


def _embedded_boxes(split: str, sizes: np.ndarray, grid: int) -> np.ndarray:
  """(N, 5) int32 rows (photo, top, left, height, width): whole photos or grid tiles."""
  if split == 'train':
    return np.array([(i, 0, 0, h, w) for i, (h, w) in enumerate(sizes)], np.int32)
  rows = []
  for i, (h, w) in enumerate(sizes):
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    rows += [(i, ys[a], xs[b], ys[a + 1] - ys[a], xs[b + 1] - xs[b])
             for a in range(grid) for b in range(grid)]
  return np.array(rows, np.int32)


def _check_embedded_split(split: str):
  if split not in EMBEDDED_SPLITS:
    raise ValueError(f'The embedded dataset has splits {EMBEDDED_SPLITS}, not {split!r}: set '
                     'config.dataset.train_split/eval_split accordingly.')


def _embedded_source(cfg, split: str, image_size: int) -> Source:
  _check_embedded_split(split)
  # Twice the output resolution, about ImageNet's ratio at 224: crops at scale 0.2 are barely
  # upsampled, and the 32x32 demo does not shrink 1000-pixel photos for every example.
  photos, sizes = _embedded_photos(max(2 * image_size, 64))
  boxes = tf.constant(_embedded_boxes(split, sizes, cfg.embedded_eval_grid))
  photo_table = tf.constant(photos)

  def load(idx):
    b = tf.gather(boxes, idx)
    image = tf.slice(photo_table, tf.stack([b[0], b[1], b[2], 0]), tf.stack([1, b[3], b[4], 3]))[0]
    return image, b[0]

  return Source(int(boxes.shape[0]), f'embedded photos ({split})', load=load,
                 example_name=lambda i: f'embedded example {i}')


# ----------------------------------------------------------------------------- scenes
def scene_count(cfg, split: str) -> int:
  from mae_jax.data import scenes  # pylint: disable=g-import-not-at-top
  if split not in scenes.SPLITS:
    raise ValueError(f'The synthetic scenes have splits {scenes.SPLITS}, not {split!r}: set '
                     'config.dataset.train_split/eval_split accordingly.')
  return int(cfg.scenes_train if split == 'train' else cfg.scenes_eval)


def _scenes_source(cfg, split: str, image_size: int) -> Source:
  from mae_jax.data import scenes  # pylint: disable=g-import-not-at-top
  images, masks = scenes.generate(split, scene_count(cfg, split),
                                  int(cfg.scene_size or image_size), int(cfg.scenes_seed))
  image_table = tf.constant(images)
  label_table = tf.constant(scenes.classify(masks))

  def load(idx):
    return tf.gather(image_table, idx), tf.gather(label_table, idx)

  return Source(len(images), f'synthetic scenes ({split})', load=load,
                 example_name=lambda i: f'synthetic scene {i} of {split!r}')


# ----------------------------------------------------------------------------- TFDS
def tfds_builder(cfg, key_fields: Tuple[str, ...] = ('image_key', 'label_key'),
                 image_fields: Tuple[str, ...] = ('image_key',)):
  """The TFDS builder of `cfg.name` (prepared first with `cfg.download`), checked to hold the
  features that `cfg.<key_fields>` name, `cfg.<image_fields>` as images."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not cfg.name:
    raise ValueError("config.dataset.name is empty: set the TFDS name, e.g. 'imagenet2012'.")
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown TFDS dataset {cfg.name!r}: check config.dataset.name against '
                     'https://www.tensorflow.org/datasets/catalog.') from e
  if cfg.download:
    config = tfds.download.DownloadConfig(manual_dir=cfg.manual_dir or None)
    try:
      builder.download_and_prepare(download_config=config)
    except AssertionError as e:  # TFDS reports a missing manual download this way.
      raise FileNotFoundError(
          f'TFDS could not prepare {cfg.name!r}: {e}\nFix: put the files it names in '
          'config.dataset.manual_dir.') from e
  for field in key_fields:
    if cfg[field] not in builder.info.features:
      raise ValueError(f'TFDS dataset {cfg.name!r} has no feature {cfg[field]!r} (features: '
                       f'{list(builder.info.features)}): set config.dataset.'
                       f'{"/".join(key_fields)}.')
  for field in image_fields:
    if not isinstance(builder.info.features[cfg[field]], tfds.features.Image):
      raise ValueError(f'Feature {cfg[field]!r} of {cfg.name!r} is not a tfds.features.Image.')
  return builder


def tfds_not_prepared(cfg, builder) -> Exception:
  manual = ''
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    manual = (f' {cfg.name} needs a manual download first: put its files in '
              'config.dataset.manual_dir (' + ' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
              + ').')
  root = cfg.data_dir or "TFDS's default data_dir"
  return FileNotFoundError(
      f'TFDS dataset {cfg.name!r} is not prepared in data_dir {root!r} (looked in '
      f'{builder.data_dir!r}).\nFix: set config.dataset.download=True, or run `tfds build '
      f'{cfg.name} --data_dir=<data_dir>` (add --file_format=array_record for random access), '
      f'or point config.dataset.data_dir at the directory that holds it.{manual}')


def tfds_split_size(cfg, builder, split: str) -> Optional[int]:
  """Example count from the dataset info; None when the info has no splits (mocked data)."""
  if not builder.info.splits:
    return None
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'TFDS dataset {cfg.name!r} has no split {split!r} (splits: '
                     f'{list(builder.info.splits)}): set config.dataset.train_split/eval_split.'
                     ) from e


def tfds_random_access(cfg, builder) -> bool:
  if cfg.tfds_read != 'auto':
    return cfg.tfds_read == 'random_access'
  formats = [builder.info.file_format] + list(getattr(builder.info, 'alternative_file_formats', []))
  return any(getattr(f, 'value', f) == 'array_record' for f in formats)


def tfds_pairs(cfg, split: str, second_field: str, second_is_image: bool,
               records_order: Optional[str] = None) -> Source:
  """The `split` of TFDS `cfg.name` as (encoded image, `cfg.<second_field>`) pairs.

  Classification reads (image, int64 label); segmentation (image, encoded mask), both images
  left undecoded. Random access where the files allow it (`tfds_random_access`), else the
  records in file order, whose examples are named `... example i<records_order>` when
  `records_order` is given.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  second_key = cfg[second_field]
  builder = tfds_builder(cfg, key_fields=('image_key', second_field),
                         image_fields=('image_key', second_field) if second_is_image
                         else ('image_key',))
  size = tfds_split_size(cfg, builder, split)
  decoders = {cfg.image_key: tfds.decode.SkipDecoding()}
  if second_is_image:
    decoders[second_key] = tfds.decode.SkipDecoding()
  second_dtype = tf.string if second_is_image else tf.int64
  describe = f'TFDS {cfg.name}[{split}]'
  if tfds_random_access(cfg, builder):
    try:
      data_source = builder.as_data_source(split=split, decoders=decoders)
    except (AssertionError, FileNotFoundError, NotImplementedError) as e:
      raise tfds_not_prepared(cfg, builder) from e
    image_key = cfg.image_key

    def fetch(idx):
      example = data_source[int(idx)]
      second = example[second_key]
      return example[image_key], (second if second_is_image else np.int64(second))

    def load(idx):
      raw, second = tf.numpy_function(fetch, [idx], (tf.string, second_dtype), stateful=False)
      raw.set_shape([])
      second.set_shape([])
      return raw, second

    return Source(len(data_source), describe, load=load,
                  example_name=lambda i: f'{describe} example {i}')
  try:
    records = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  except AssertionError as e:
    raise tfds_not_prepared(cfg, builder) from e
  records = records.map(lambda ex: (ex[cfg.image_key], ex[second_key]))
  if not size:
    size = int(records.cardinality())
    if size < 0:
      raise ValueError(f'{describe}: unknown number of examples; prepare the dataset with TFDS.')
  if records_order is None:
    return Source(size, describe, records=lambda: records)
  return Source(size, describe, records=lambda: records,
                example_name=lambda i: f'{describe} example {i}{records_order}')


def open_source(cfg, split: str, image_size: int) -> Source:
  """The `split` of the dataset that `cfg` (a resolved config.dataset) names."""
  if cfg.source == 'embedded':
    return _embedded_source(cfg, split, image_size)
  if cfg.source == 'imagefolder':
    return _image_folder_source(cfg, split)
  if cfg.source == 'scenes':
    return _scenes_source(cfg, split, image_size)
  return tfds_pairs(cfg, split, 'label_key', second_is_image=False)


def split_size(cfg, split: str) -> int:
  """Number of examples in `split`, without reading any image."""
  if cfg.source == 'embedded':
    _check_embedded_split(split)
    per_photo = 1 if split == 'train' else cfg.embedded_eval_grid ** 2
    return len(EMBEDDED_PHOTOS) * per_photo
  if cfg.source == 'imagefolder':
    return len(_image_folder_split(cfg.data_dir, split, cfg.train_split)[1])
  if cfg.source == 'scenes':
    return scene_count(cfg, split)
  size = tfds_split_size(cfg, tfds_builder(cfg), split)
  return size if size is not None else tfds_pairs(cfg, split, 'label_key', second_is_image=False).num_examples


def class_count(cfg) -> int:
  """Number of label classes (embedded: one per photo; ImageFolder: train split's class dirs;
  scenes: one per shape kind)."""
  if cfg.source == 'embedded':
    return len(EMBEDDED_PHOTOS)
  if cfg.source == 'scenes':
    from mae_jax.data import scenes  # pylint: disable=g-import-not-at-top
    return len(scenes.SHAPES)
  if cfg.source == 'imagefolder':
    return len(_image_folder_split(cfg.data_dir, cfg.train_split, cfg.train_split)[0])
  label = tfds_builder(cfg).info.features[cfg.label_key]
  if not getattr(label, 'num_classes', None):
    raise ValueError(f'Feature {cfg.label_key!r} of {cfg.name!r} is not a ClassLabel.')
  return label.num_classes
