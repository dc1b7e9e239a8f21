"""The online k-NN monitor of pretraining: how good the encoder is, while it trains.

`config.monitor` (`recipes.monitor_config`, off by default) with `every_steps=N > 0`: at
step 0, every N steps and at the last step, the encoder's features (all patches, no
masking: `mae_jax.features`) of a fixed set of labelled training images (the memory bank)
and of eval images are compared by similarity-weighted k-NN (`mae_jax.evaluators.knn`);
`knn_top1` (of `monitor.pool`), `knn_top1_cls`, `knn_top1_mean` and the seconds it took
(`knn_seconds`) go to metrics.jsonl and TensorBoard.

The images are read once, before training (spread evenly over each split, eval
transform, kept as uint8 in host memory), so a check costs two forward passes of the
encoder over them and a k-NN, and no input pipeline. It reads a host copy of the params
and touches neither the train step, its random keys nor the training data stream: the
run's trajectory is the same with and without it. Every process computes the same numbers
(on its local devices); process 0 writes them.
"""
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from mae_jax.data import pipeline
from mae_jax.evaluators import knn
from mae_jax.model import features as features_lib

_DATASET_FIELDS = ('source', 'name', 'data_dir', 'train_split', 'eval_split')


def check_config(monitor: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.monitor` field and the fix."""
  from mae_jax.jobs import recipes  # pylint: disable=g-import-not-at-top
  known = set(recipes.monitor_config())
  unknown = sorted(set(monitor) - known)
  if unknown:
    raise ValueError(f'Unknown config.monitor field(s) {unknown}; known: {sorted(known)}.')
  every = monitor.every_steps
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(f'config.monitor.every_steps must be an integer >= 0 (0: off), got '
                     f'{every!r}.')
  for field in ('num_train_examples', 'num_eval_examples', 'k', 'batch_size'):
    if int(monitor[field]) < 1:
      raise ValueError(f'config.monitor.{field} must be >= 1, got {monitor[field]}.')
  if not float(monitor.temperature) > 0:
    raise ValueError(f'config.monitor.temperature must be positive, got {monitor.temperature}.')
  if monitor.pool not in features_lib.POOLS:
    raise ValueError(f'config.monitor.pool={monitor.pool!r}: choose from {features_lib.POOLS}.')


def monitor_dataset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.dataset with the monitor's non-empty dataset fields put in."""
  ds = config.dataset.copy_and_resolve_references()
  for field in _DATASET_FIELDS:
    if config.monitor[field]:
      ds[field] = config.monitor[field]
  return ds


class KnnMonitor:
  """Call once per step with the loop's params; evaluates on the monitor's steps."""

  def __init__(self, config: ml_collections.ConfigDict, total_steps: int,
               to_host: Callable[[Any], Any]):
    """Reads the monitor's images (nothing when it is off); errors name the fix.

    `to_host` turns the params the loop holds into host arrays: the job's
    `parallel.Layout.host_state`.
    """
    self.to_host = to_host
    check_config(config.monitor)
    self.every = int(config.monitor.every_steps)
    self.total_steps = total_steps
    self.data: Dict[str, Dict[str, np.ndarray]] = {}
    if not self.every:
      return
    mon = config.monitor
    self.dataset = monitor_dataset(config)
    self.model_config = config.model.to_dict()
    size = self.model_config['img_size']
    size = size if isinstance(size, int) else int(size[0])
    start = time.time()
    for role, split, count in (('train', self.dataset.train_split, mon.num_train_examples),
                               ('eval', self.dataset.eval_split, mon.num_eval_examples)):
      n = pipeline.num_examples(self.dataset, split)
      self.data[role] = pipeline.eval_examples(
          self.dataset, split=split, indices=pipeline.spread_indices(n, min(count, n), config.seed),
          image_size=size)
      if np.any(self.data[role]['label'] < 0):
        raise ValueError(f'The k-NN monitor needs labels; split {split!r} has none. Set '
                         f'config.monitor.train_split / eval_split to labelled splits.')
    self.k = min(int(mon.k), len(self.data['train']['label']))
    if self.k < int(mon.k):
      logging.warning('k-NN monitor: k=%d, as the memory bank holds only %d images.', self.k,
                      self.k)
    self.temperature = float(mon.temperature)
    self.pool = mon.pool
    self.batch_size = int(mon.batch_size)
    logging.info('k-NN monitor every %d steps: %d train (%s) / %d eval (%s) images of %s, '
                 'k=%d, T=%g, pool %s; read in %.1f s.', self.every,
                 len(self.data['train']['label']), self.dataset.train_split,
                 len(self.data['eval']['label']), self.dataset.eval_split, self.dataset.source,
                 self.k, self.temperature, self.pool, time.time() - start)

  def due(self, step: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == self.total_steps)

  def _features(self, enc_params: Any, images: np.ndarray) -> Dict[str, np.ndarray]:
    parts = []
    for start in range(0, len(images), self.batch_size):
      chunk = pipeline.normalize_images(images[start:start + self.batch_size], self.dataset)
      parts.append(features_lib.features(enc_params, chunk, self.model_config,
                                         batch_size=self.batch_size))
    return {p: np.concatenate([part[p] for part in parts]) for p in features_lib.POOLS}

  def evaluate(self, params: Any) -> Dict[str, float]:
    """k-NN top-1 (percent) of the encoder in `params` (host or device tree, unreplicated)."""
    start = time.time()
    enc = features_lib.replicate_params(params['encoder'])
    train = self._features(enc, self.data['train']['image'])
    test = self._features(enc, self.data['eval']['image'])
    result = {f'knn_top1_{p}': knn.knn_top1(train[p], self.data['train']['label'], test[p],
                                            self.data['eval']['label'], k=self.k,
                                            temperature=self.temperature)
              for p in features_lib.POOLS}
    result['knn_top1'] = result[f'knn_top1_{self.pool}']
    result['knn_seconds'] = time.time() - start
    return result

  def __call__(self, step: int, params: Any, logger: Any) -> Optional[Dict[str, float]]:
    """On a monitor step: evaluates the params after `step` steps and logs; else nothing.

    The training clock restarts afterwards, so images/s stays the train step's speed (the
    monitor's own time is `knn_seconds`).
    """
    if not self.due(step):
      return None
    encoder = jax.block_until_ready(params['encoder'])  # queued steps finish first
    result = self.evaluate({'encoder': self.to_host(encoder)})
    logging.info('step %d: k-NN top-1 %.2f%% (%s; cls %.2f%%, mean %.2f%%) in %.1f s', step,
                 result['knn_top1'], self.pool, result['knn_top1_cls'],
                 result['knn_top1_mean'], result['knn_seconds'])
    logger.log_scalars(step, result)
    logger.restart_clock(step)
    return result
