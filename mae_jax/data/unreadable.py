"""Unreadable images: named in a clear error (bad_images='error'), or read around ('skip').

`BatchIterator` turns a tf.data pipeline into NumPy batches. When a batch fails to decode
it either re-raises the failure naming the file (`diagnose_fn` decodes the examples of that
batch one by one), or, with bad_images='skip', adds the examples of that batch that do not
decode to a set of suspects and rebuilds the pipeline from that batch on. The pipeline reads
a stand-in where a suspect would be read, and `BatchIterator` fills the slot with the
first of the position's candidates that reads (the stream's own example first, then
the examples after it in its epoch's permutation; for evaluation, the example or nothing).
That outcome depends only on the position and the files, not on when a file was found bad,
so a resumed run sees the same replacements as an uninterrupted one; every other position
is read by the plain pipeline, at its full speed.
"""
import re
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from mae_jax.data import preprocess
from mae_jax.data import sources

# With bad_images='skip', an unreadable training example is replaced by the first readable one
# of this many candidates; that many unreadable ones in a row stop the run (the data is broken).
MAX_REPLACEMENTS = 8


def flag_suspects(element: Callable, suspects: FrozenSet[int], stand_in: int,
                  example_of: Callable, eval_size: Optional[int]) -> Callable:
  """`element(position, example=None)`, but where the position's example (`example_of`) is
  in `suspects` it reads example `stand_in` (a readable one) instead and flags the slot
  'suspect' for `BatchIterator`, which fills it. No branch: the other positions cost one
  table lookup more. `eval_size`: evaluation's example count (positions past it are padding)."""
  keys = tf.constant(sorted(suspects), tf.int64)
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      keys, tf.ones_like(keys)), default_value=0)
  stand_in = tf.constant(stand_in, tf.int64)

  def flagged(position):
    idx = example_of(position)
    suspect = table.lookup(idx) > 0
    if eval_size is not None:
      suspect = suspect & (position < eval_size)
    example = element(position, example=tf.where(suspect, stand_in, idx))
    return dict(example, suspect=suspect)

  return tf.autograph.experimental.do_not_convert(flagged)


def resolver(transform: Callable, load: Callable, candidate: Callable, mean, std) -> Callable:
  """(position, k) -> (normalised image, label) of example `candidate(position, k)`, as the
  pipeline makes them; raises tf.errors.OpError if it does not read."""
  @tf.function(input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)])
  def resolve(position, k):
    raw, label = load(candidate(position, k))
    image = transform(raw, position)
    if image.dtype == tf.uint8:
      image = preprocess.normalize(image[None], mean, std)[0]  # as `finalize` does a batch
    return image, tf.cast(label, tf.int32)

  return resolve


class BatchIterator:
  """NumPy batches of `build(start_step, suspects)`; a decoding failure is re-raised naming the
  example (file) that caused it, or, with `skip`, adds `find_suspects(step)` and rebuilds.

  Slots flagged 'suspect' are filled by `resolve(position, k)` (the finalised image and
  label of candidate k, or an OpError) with the first k that reads, of `tries`. The first
  batch is read at construction, so a bad file in it stops a run before its model compiles.
  `bad_images` counts the unreadable examples replaced (training) or dropped (evaluation)
  so far, as read (the pipeline runs a few batches ahead of training).
  """

  def __init__(self, build: Callable[[int, FrozenSet[int], int], tf.data.Dataset],
               diagnose: Callable[[int, Exception], Exception], step: int, skip: bool,
               find_suspects: Callable[[int], Tuple[List[int], List[int]]], resolve: Callable,
               tries: int, name_bad: Callable[[int, int], List[str]]):
    self._build = build
    self._diagnose = diagnose
    self._step = step
    self._skip = skip
    self._find_suspects = find_suspects
    self._resolve = resolve
    self._tries = tries
    self._name_bad = name_bad
    self._suspects: FrozenSet[int] = frozenset()
    self._stand_in = 0  # a readable example, read (and then replaced) in suspects' slots
    self._named: Set[str] = set()
    self.bad_images = 0
    self._iterator = build(step, self._suspects, self._stand_in).as_numpy_iterator()
    try:
      self._first: Optional[Dict[str, np.ndarray]] = self._read()
    except StopIteration:
      self._first = None

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._first is not None:
      batch, self._first = self._first, None
      return batch
    return self._read()

  def _read(self) -> Dict[str, np.ndarray]:
    while True:
      try:
        batch = next(self._iterator)
        break
      except tf.errors.OpError as e:
        new, readable = self._find_suspects(self._step) if self._skip else ([], [])
        new = set(new) - self._suspects
        if not new or not (readable or self._suspects):
          # 'error', or a failure that reading around examples cannot fix
          raise self._diagnose(self._step, e) from e
        if not self._suspects:
          self._stand_in = readable[0]
        logging.warning("Batch %d holds an unreadable image (%s); config.dataset.bad_images="
                        "'skip': reading %d example(s) through their replacements from here "
                        'on.', self._step, op_error_text(e), len(new))
        self._suspects = self._suspects | new
        self._iterator = self._build(self._step, self._suspects,
                                     self._stand_in).as_numpy_iterator()
    batch = self._complete(batch)
    self._step += 1
    return batch

  def _complete(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`batch` with its suspect slots filled and the flags removed."""
    if 'suspect' not in batch:
      return batch
    slots = np.flatnonzero(batch.pop('suspect'))
    if slots.size:
      batch = {k: v.copy() for k, v in batch.items()}
      for slot in slots:
        self._fill(batch, slot)
    return batch

  def _fill(self, batch: Dict[str, np.ndarray], slot: int) -> None:
    position = int(batch['index'][slot])
    for k in range(self._tries):
      try:
        image, label = self._resolve(tf.constant(position, tf.int64), tf.constant(k, tf.int64))
      except tf.errors.OpError:
        continue
      batch['image'][slot], batch['label'][slot] = image.numpy(), label.numpy()
      if 'valid' in batch:
        batch['valid'][slot] = True
      self._count(position, k)
      return
    if 'valid' in batch:  # evaluation: the example is dropped
      batch['valid'][slot], batch['label'][slot] = False, -1
      self._count(position, 1)
      return
    raise broken_data_error(position, self._step, self._tries, self._name_bad(position, 3))

  def _count(self, position: int, k: int) -> None:
    if not k:
      return
    self.bad_images += k
    for name in self._name_bad(position, k):
      if name not in self._named:
        self._named.add(name)
        logging.warning("Skipping %s (config.dataset.bad_images='skip'); %d unreadable "
                        'example(s) replaced or dropped so far.', name, self.bad_images)


def broken_data_error(position: int, step: int, tries: int, names: List[str]) -> ValueError:
  """The error of a stream position none of whose `tries` candidates reads."""
  return ValueError(
      f'Stream position {position} (batch {step}): {tries} examples in a row are unreadable '
      f'({"; ".join(names)}; ...). The data looks broken, not just a few files: check '
      'config.dataset.data_dir and the files.')


def op_error_text(error: Exception) -> str:
  """First line of a TF error without the TF-internal function and op names."""
  text = str(getattr(error, 'message', error)).strip().splitlines()[0]
  text = re.sub(r'\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$', '', text)
  text = re.sub(r'^Error in user-defined function passed to \S+ transformation with iterator: '
                r'\S+: ', '', text)
  return text.strip().rstrip('.')


def _load_error(source: sources.Source, idx: int) -> Optional[str]:
  """Why example `idx` cannot be read, decoding it whole (eagerly), or None if it can."""
  try:
    raw, _ = source.load(tf.constant(idx, tf.int64))
    if raw.dtype == tf.string:
      preprocess.decode_rgb(raw)
  except tf.errors.OpError as e:
    return op_error_text(e)
  return None


def _batch_examples(positions: Callable[[int], range],
                    example_of: Callable[[int], Optional[int]], step: int) -> List[int]:
  ids = []
  for position in positions(step):
    idx = example_of(position)
    if idx is None:  # evaluation padding
      break
    ids.append(idx)
  return ids


def diagnose_fn(source: sources.Source, positions: Callable[[int], range],
                example_of: Callable[[int], Optional[int]]):
  """Finds the unreadable example of a failed step by decoding its examples one by one.

  `example_of(position)` is the example id at a stream position (None: padding).
  """
  def diagnose(step: int, error: Exception) -> Exception:
    if source.load is not None:
      for idx in _batch_examples(positions, example_of, step):
        reason = _load_error(source, idx)
        if reason is not None:
          return ValueError(
              f'Cannot read {source.example_name(idx)} of {source.describe}: {reason}.\n'
              'Fix: replace or delete it (images must be valid JPEG, PNG, GIF, BMP or WebP '
              "files), or set config.dataset.bad_images='skip' to replace unreadable images.")
    return RuntimeError(f'Reading {source.describe} failed at step {step}: '
                        f'{op_error_text(error)}\n'
                        'Fix: check that the dataset files are complete and readable '
                        '(re-prepare a TFDS dataset with `tfds build`).')

  return diagnose


def suspects_fn(source: sources.Source, positions: Callable[[int], range],
                example_of: Callable[[int], Optional[int]],
                tried: Callable[[int, int], List[int]], tries: int
                ) -> Callable[[int], Tuple[List[int], List[int]]]:
  """step -> (suspects, readable) of that batch: the examples that do not decode whole, or,
  if every one does (a crop window failed), all of them (reading a good example through its
  candidates gives that example, so suspecting too many costs speed only); and examples
  that decode (of the batch, else of its positions' candidates `tried(position, tries)`).

  Raises:
    ValueError: when no example of the batch nor any candidate of its first position reads.
  """
  def find_suspects(step: int) -> Tuple[List[int], List[int]]:
    ids = _batch_examples(positions, example_of, step)
    bad = [i for i in ids if _load_error(source, i) is not None]
    readable = [i for i in ids if i not in bad]
    if not readable and ids:
      first = positions(step)[0]
      readable = [i for i in tried(first, tries)[1:] if _load_error(source, i) is None][:1]
      if not readable:
        names = [f'{source.example_name(i)} of {source.describe} ({_load_error(source, i)})'
                 for i in tried(first, tries)[:3]]
        raise broken_data_error(first, step, tries, names)
    return (bad or ids), readable

  return find_suspects


def bad_namer(source: sources.Source, tried: Callable[[int, int], List[int]]
              ) -> Callable[[int, int], List[str]]:
  """(position, k) -> names, with the reason, of the k unreadable examples tried there.

  `tried(position, k)` gives their ids.
  """
  def name_bad(position: int, k: int) -> List[str]:
    names = []
    for idx in tried(position, k):
      reason = _load_error(source, idx) or 'it decodes whole, but its crop window did not'
      names.append(f'{source.example_name(idx)} of {source.describe} ({reason})')
    return names

  return name_bad
