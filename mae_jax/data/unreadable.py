"""Unreadable images: named in a clear error (bad_images='error'), or read around ('skip').

`BatchIterator` turns a tf.data pipeline into NumPy batches. When a batch fails to decode
it either re-raises the failure naming the file (`diagnose_fn` decodes the examples of that
batch one by one), or, with bad_images='skip', rebuilds the pipeline from that batch on with
`robust_elements`: each example is then read through a fixed list of candidates (the
stream's own example first, then replacements drawn from the seed and the stream position),
so a resumed run sees the same replacements as an uninterrupted one. Until the first failure
the pipeline is the plain one, at its full speed.
"""
import re
from typing import Callable, Dict, List, Optional, Set

from absl import logging
import numpy as np
import tensorflow as tf

from mae_jax.data import preprocess
from mae_jax.data import sources

# With bad_images='skip', an unreadable training example is replaced by the first readable one
# of this many candidates; that many unreadable ones in a row stop the run (the data is broken).
MAX_REPLACEMENTS = 8


def robust_elements(transform, load, candidate: Callable, n: int, image_size: int, train: bool,
                    image_dtype: tf.DType) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """`position -> Dataset` of one example dict that tolerates unreadable images.

  Training: the first of candidates k = 0..MAX_REPLACEMENTS-1 (`candidate(position, k)`, an
  example id; k = 0 is the stream's own example) that reads and transforms without error,
  with 'replaced' = k, the number that failed before it (MAX_REPLACEMENTS: all failed, the
  image is zeros and `BatchIterator` stops). Evaluation: the example, or on failure a
  padding element (valid False) with 'replaced' = 1. Where nothing fails the example is
  exactly the plain pipeline's.
  """
  tries = MAX_REPLACEMENTS if train else 1

  def attempt(position, k):
    def real():
      raw, label = load(candidate(position, k) if train else tf.minimum(position, n - 1))
      return transform(raw, position), tf.cast(label, tf.int32), tf.constant(True)

    def failed():  # reached only after every try failed
      return (tf.zeros([image_size, image_size, 3], image_dtype), tf.constant(-1, tf.int32),
              tf.constant(False))

    if train:
      image, label, _ = tf.cond(k < tries, real, failed)
      return {'image': image, 'label': label, 'index': position,
              'replaced': tf.cast(k, tf.int32)}
    image, label, valid = tf.cond((k < tries) & (position < n), real, failed)
    return {'image': image, 'label': label, 'index': position, 'valid': valid,
            'replaced': tf.cast((k > 0) & (position < n), tf.int32)}

  def elements(position):
    # Lazy: candidate k + 1 is read only when candidate k failed.
    return (tf.data.Dataset.range(tries + 1).map(lambda k: attempt(position, k))
            .ignore_errors().take(1))

  return tf.autograph.experimental.do_not_convert(elements)


class BatchIterator:
  """NumPy batches of `build(start_step, robust)`; a decoding failure is re-raised naming the
  example (file) that caused it, or, with `skip`, switches to the robust pipeline.

  The first batch is read at construction, so a bad file in it stops a run before its model
  compiles. `bad_images` counts the unreadable examples replaced (training) or dropped
  (evaluation) so far, as read (the pipeline runs a few batches ahead of training).
  """

  def __init__(self, build: Callable[[int, bool], tf.data.Dataset],
               diagnose: Callable[[int, Exception], Exception], step: int, skip: bool,
               name_bad: Callable[[int, int], List[str]]):
    self._build = build
    self._diagnose = diagnose
    self._step = step
    self._skip = skip
    self._name_bad = name_bad
    self._robust = False
    self._named: Set[str] = set()
    self.bad_images = 0
    self._iterator = build(step, False).as_numpy_iterator()
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
        if not self._skip or self._robust:
          raise self._diagnose(self._step, e) from e
        logging.warning("Batch %d holds an unreadable image (%s); config.dataset.bad_images="
                        "'skip': reading each example through its replacements from here on.",
                        self._step, op_error_text(e))
        self._robust = True
        self._iterator = self._build(self._step, True).as_numpy_iterator()
    if 'replaced' in batch:
      self._count(batch.pop('replaced'), batch['index'])
    self._step += 1
    return batch

  def _count(self, replaced: np.ndarray, positions: np.ndarray) -> None:
    for k, position in zip(replaced.tolist(), positions.tolist()):
      if not k:
        continue
      if k >= MAX_REPLACEMENTS:
        names = self._name_bad(position, 3)
        raise ValueError(
            f'Stream position {position} (batch {self._step}): {k} examples in a row are '
            f'unreadable ({"; ".join(names)}; ...). The data looks broken, not just a few '
            f'files: check config.dataset.data_dir and the files.')
      self.bad_images += k
      for name in self._name_bad(position, k):
        if name not in self._named:
          self._named.add(name)
          logging.warning("Skipping %s (config.dataset.bad_images='skip'); %d unreadable "
                          'example(s) replaced or dropped so far.', name, self.bad_images)


def op_error_text(error: Exception) -> str:
  """First line of a TF error without the TF-internal function and op names."""
  text = str(getattr(error, 'message', error)).strip().splitlines()[0]
  return re.sub(r'\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$', '', text).strip().rstrip('.')


def _load_error(source: sources.Source, idx: int) -> Optional[str]:
  """Why example `idx` cannot be read, decoding it whole (eagerly), or None if it can."""
  try:
    raw, _ = source.load(tf.constant(idx, tf.int64))
    if raw.dtype == tf.string:
      preprocess.decode_rgb(raw)
  except tf.errors.OpError as e:
    return op_error_text(e)
  return None


def diagnose_fn(source: sources.Source, positions: Callable[[int], range],
                example_of: Callable[[int], Optional[int]]):
  """Finds the unreadable example of a failed step by decoding its examples one by one.

  `example_of(position)` is the example id at a stream position (None: padding).
  """
  def diagnose(step: int, error: Exception) -> Exception:
    if source.load is not None:
      for position in positions(step):
        idx = example_of(position)
        if idx is None:
          break
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
