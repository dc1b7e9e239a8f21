"""Feature extraction: `python -m mae_jax.main --config=configs/extract_features.py ...`.

Runs a pretrained encoder (all patches, no masking, final norm: `mae_jax.features`) over the
train and eval splits of `config.dataset` with the eval transform (resize the shorter side
to size / 0.875, centre crop) and writes, per split, `<workdir>/features_<split>.npz`:

    cls    float32 (N, D)  the normed cls token
    mean   float32 (N, D)  the mean of the normed patch tokens
    label  int32 (N,)      the dataset's label
    index  int64 (N,)      the example's position in the split: row i is example i

Rows are in the split's order (ImageFolder: class directories sorted, files sorted within
each; TFDS: the split's record order; the embedded photos: photo by photo), every example
exactly once: each process computes the features of its share of every global batch on
its local devices, the shares are gathered in process order, and the padding that
completes the last batch is dropped. Process 0 writes the files (a temporary file renamed
into place, so a killed run never leaves a partial one).

With labelled train and eval splits, the eval split is classified by k-NN against the
train split (`knn_top1`, `mae_jax.evaluators.knn`) and by a logistic regression fitted on
the standardised train features (`logreg_top1_<pool>`, `mae_jax.evaluators.logistic`).
These go to the log, metrics.jsonl and TensorBoard (at the checkpoint's training step) and
to `<workdir>/features.json` with the files' description.
"""
import datetime
import json
import re
import time
from typing import Any, Dict, List, Optional

from absl import logging
from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mae_jax.data import pipeline
from mae_jax.evaluators import knn
from mae_jax.evaluators import logistic
from mae_jax.io import checkpoint
from mae_jax.io import metrics_log
from mae_jax.jobs import architecture
from mae_jax.jobs import pretrain
from mae_jax.model import classifier as classifier_lib
from mae_jax.model import features as features_lib
from mae_jax.model.patches import grid_size

FIELDS = ('job', 'model', 'default_model', 'dataset', 'splits', 'init_from', 'allow_random_init',
          'seed', 'batch_size', 'knn', 'logreg', 'log_every_seconds')
ROLES = ('train', 'eval')
SUMMARY_FILE = 'features.json'
ORDER = ('row i is example i of the split (index == arange(N)): ImageFolder class directories '
         'sorted, files sorted within each; TFDS the split order; embedded photo by photo')


def features_file(split: str) -> str:
  """`features_<split>.npz`, characters other than letters, digits, '.', '-', '_' as '_'."""
  return f'features_{re.sub(r"[^A-Za-z0-9_.-]+", "_", split)}.npz'


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix, before any data or checkpoint is read."""
  unknown = sorted(set(config.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f'Unknown config field(s) {unknown} for feature extraction; known: '
                     f'{sorted(FIELDS)}. Start from recipes.extract_features_config().')
  if not config.get('init_from') and not config.get('allow_random_init'):
    raise ValueError('No encoder to extract features with: set --config.init_from=<pretraining '
                     'workdir, checkpoint folder or converted release>, or '
                     '--config.allow_random_init=True for a random-init baseline.')
  roles = [r.strip() for r in str(config.splits).split(',') if r.strip()]
  if not roles or set(roles) - set(ROLES):
    raise ValueError(f'config.splits={config.splits!r}: a comma-separated list of {ROLES} '
                     f'(config.dataset.train_split, eval_split), e.g. --config.splits=eval.')
  if config.knn.pool not in features_lib.POOLS:
    raise ValueError(f'config.knn.pool={config.knn.pool!r}: choose from {features_lib.POOLS}.')
  if int(config.knn.k) < 1 or not float(config.knn.temperature) > 0:
    raise ValueError(f'config.knn.k ({config.knn.k}) must be >= 1 and config.knn.temperature '
                     f'({config.knn.temperature}) positive.')
  if not float(config.logreg.C) > 0:
    raise ValueError(f'config.logreg.C={config.logreg.C} must be positive.')
  pretrain.local_batch_size(config.batch_size)


def load_encoder(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The encoder params for `config.model` (resolved): from `init_from`, or a random init.

  A resolution other than the checkpoint's gets the position table interpolated, as the
  downstream jobs do.
  """
  model_config = config.model.to_dict()
  grid = grid_size(pretrain.input_image_size(config), int(model_config['patch_size']))
  if config.get('init_from'):
    params, stored = checkpoint.load_params(config.init_from)
    try:
      enc = classifier_lib.encoder_for_grid(params, stored, grid, int(model_config['patch_size']))
    except ValueError as e:
      raise checkpoint.CheckpointError(f'config.init_from={config.init_from}: {e}') from e
  else:
    logging.warning('No config.init_from: the encoder is RANDOMLY initialised (baseline).')
    encoder = features_lib.encoder_from_config(model_config)
    size = pretrain.input_image_size(config)
    dummy = np.zeros((1, size, size, int(model_config.get('in_chans', 3))), np.float32)
    enc = jax.device_get(jax.jit(encoder.init)(jax.random.PRNGKey(config.seed), dummy)['params'])
  _check_shapes(enc, config)
  return enc


def _check_shapes(enc: Dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """The encoder tree against the configured architecture, naming the first mismatch."""
  model_config = config.model.to_dict()
  encoder = features_lib.encoder_from_config(model_config, learn_pos_embed='pos_embed' in enc)
  size = pretrain.input_image_size(config)
  shapes = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(
      (1, size, size, int(model_config.get('in_chans', 3))), np.float32))['params']
  classifier_lib.check_pretrained_encoder({'encoder': shapes}, {'encoder': enc},
                                          str(config.get('init_from') or 'the random init'))


def extract_split(enc_params: Any, config: ml_collections.ConfigDict, split: str
                  ) -> Dict[str, np.ndarray]:
  """{'cls', 'mean', 'label', 'index'} of every example of `split`, in order, on every host."""
  ds = config.dataset
  n = pipeline.num_examples(ds, split)
  host_batch = pretrain.local_batch_size(config.batch_size)
  batches = pipeline.create_dataset(ds, split=split, mode='eval',
                                    global_batch_size=config.batch_size,
                                    image_size=pretrain.input_image_size(config), seed=config.seed)
  model_config = config.model.to_dict()
  parts: Dict[str, List[np.ndarray]] = {k: [] for k in ('cls', 'mean', 'label', 'index')}
  start = last_log = time.time()
  done = 0
  for batch in batches:
    feats = features_lib.features(enc_params, batch['image'], model_config,
                                  batch_size=host_batch)
    local = {'cls': feats['cls'], 'mean': feats['mean'], 'label': batch['label'],
             'index': batch['index'], 'valid': batch['valid']}
    if jax.process_count() > 1:  # each host's share, concatenated in process order
      local = jax.tree.map(np.asarray, multihost_utils.process_allgather(local, tiled=True))
    keep = np.asarray(local['valid'], bool)
    for key in parts:
      parts[key].append(np.asarray(local[key])[keep])
    done += int(keep.sum())
    now = time.time()
    if now - last_log >= config.log_every_seconds or done == n:
      rate = done / max(now - start, 1e-9)
      logging.info('features_%s: %d/%d images (%.1f%%), %.0f img/s, ETA %s', split, done, n,
                   100.0 * done / max(n, 1), rate,
                   datetime.timedelta(seconds=int((n - done) / max(rate, 1e-9))))
      last_log = now
  out = {k: np.concatenate(v) for k, v in parts.items()}
  out['cls'] = out['cls'].astype(np.float32)
  out['mean'] = out['mean'].astype(np.float32)
  out['label'] = out['label'].astype(np.int32)
  out['index'] = out['index'].astype(np.int64)
  if not np.array_equal(out['index'], np.arange(n)):
    raise RuntimeError(f'Extracted {len(out["index"])} rows of {split!r} (expected {n} in '
                       f'order): the input pipeline did not yield each example once.')
  return out


def _write_npz(path: epath.Path, arrays: Dict[str, np.ndarray]) -> None:
  tmp = path.parent / (path.name + '.tmp')
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
  tmp.rename(path)


def evaluate(train: Dict[str, np.ndarray], test: Dict[str, np.ndarray],
             config: ml_collections.ConfigDict) -> Dict[str, float]:
  """k-NN top-1 (each pool; `knn_top1` is config.knn.pool's) and, if enabled, the
  logistic-regression probe's top-1 of each pool, in percent."""
  results = {}
  k = min(int(config.knn.k), len(train['label']))
  if k < int(config.knn.k):
    logging.warning('k-NN with k=%d: the train split has only %d examples.', k, k)
  for pool in features_lib.POOLS:
    results[f'knn_top1_{pool}'] = knn.knn_top1(
        train[pool], train['label'], test[pool], test['label'], k=k,
        temperature=float(config.knn.temperature))
  results['knn_top1'] = results[f'knn_top1_{config.knn.pool}']
  if config.logreg.enabled:
    for pool in features_lib.POOLS:
      probe = logistic.probe(train[pool], train['label'], test[pool], test['label'],
                             C=float(config.logreg.C), max_iter=int(config.logreg.max_iter),
                             tol=float(config.logreg.tol))
      results[f'logreg_top1_{pool}'] = probe['top1']
      if not probe['converged']:
        logging.warning('The logistic regression on %s features stopped at max_iter=%d before '
                        'converging: raise config.logreg.max_iter.', pool,
                        int(config.logreg.max_iter))
  return results


def _log_metrics(out_dir: epath.Path, step: int, metrics: Dict[str, float]) -> None:
  """Appends to metrics.jsonl and TensorBoard; never rewrites earlier records (the workdir
  may be a pretraining workdir)."""
  writer = metric_writers.SummaryWriter(str(out_dir))
  writer.write_scalars(step, metrics)
  writer.close()
  with (out_dir / metrics_log.METRICS_FILE).open('a') as f:
    f.write(json.dumps({'step': step, 'time': time.time(), **metrics}) + '\n')


def _labelled(arrays: Optional[Dict[str, np.ndarray]]) -> bool:
  return (arrays is not None and len(arrays['label']) > 0
          and bool(np.all(arrays['label'] >= 0)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Extracts the features of the configured splits into `workdir`; returns the metrics
  (k-NN and probe top-1 when both splits are labelled) and the files written."""
  metrics_log.quiet_library_logs()
  # 1. Config, checkpoint, architecture and data problems fail here, before any compute.
  check_config(config)
  config = architecture.resolve(config, config.get('init_from'))
  ds = config.dataset
  roles = [r.strip() for r in str(config.splits).split(',')]
  splits = list(dict.fromkeys(ds.train_split if r == 'train' else ds.eval_split
                              for r in ROLES if r in roles))
  sizes = {s: pipeline.num_examples(ds, s) for s in splits}
  enc_params = load_encoder(config)
  step = (checkpoint.load_step(config.init_from) if config.get('init_from') else None) or 0
  logging.info('Extracting features of %s (%s) with the encoder of %s at step %d, global '
               'batch %d over %d device(s) in %d process(es).',
               ', '.join(f'{s} ({n} images)' for s, n in sizes.items()), ds.source,
               config.get('init_from') or 'a random init', step, config.batch_size,
               jax.device_count(), jax.process_count())

  # 2. Features of each split.
  enc_params = features_lib.replicate_params(enc_params)
  out_dir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
  extracted, files = {}, {}
  for split in splits:
    extracted[split] = extract_split(enc_params, config, split)
    files[split] = str(out_dir / features_file(split))
    if is_main:
      _write_npz(out_dir / features_file(split), extracted[split])
      logging.info('Wrote %s: cls, mean %s float32, label, index.', files[split],
                   extracted[split]['cls'].shape)

  # 3. k-NN and the logistic-regression probe, when both splits have labels.
  metrics: Dict[str, float] = {}
  train = extracted.get(ds.train_split)
  test = extracted.get(ds.eval_split)
  if ds.train_split != ds.eval_split and _labelled(train) and _labelled(test):
    metrics = evaluate(train, test, config)
    logging.info('Step %d: %s', step, ', '.join(f'{k} {v:.2f}%' for k, v in metrics.items()))
  if is_main:
    if metrics:
      _log_metrics(out_dir, step, metrics)
    summary = {'checkpoint': config.get('init_from'), 'step': step,
               'model': config.model.to_dict(), 'order': ORDER,
               'files': {s: {'path': files[s], 'count': sizes[s],
                             'dim': int(extracted[s]['cls'].shape[1])} for s in splits},
               'metrics': metrics}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + '\n')
  return {**metrics, 'files': files}
