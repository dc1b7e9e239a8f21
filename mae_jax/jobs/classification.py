"""Pieces shared by the downstream protocols (linear probe, full and partial fine-tuning).

- `TrainState`: the trained params with their optimizer state, plus `frozen` params
  that the step reads but neither differentiates nor gives optimizer state, and the
  BatchNorm statistics of the linear probe.
- `split_params` / `merge_params`: cut the classifier tree into trained and frozen parts.
- `eval_step`: top-1 / top-5 counts over the valid (non-padding) examples, psum'd.
- `check_config` and `init_params`: every bad-input check (protocol, block count,
  checkpoint presence and shapes) runs here, before data or compilation.
"""
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mae_jax.model import classifier as classifier_lib
from mae_jax.model.patches import to_2tuple

AXIS = 'batch'
Params = Dict[str, Any]
Path = Tuple[str, ...]

JOBS = ('linear_probe', 'finetune')


class TrainState(train_state.TrainState):
  """`params` are trained by `tx`; `frozen` params are read only; `batch_stats` is the BN state."""
  frozen: Any = None
  batch_stats: Any = None

  def variables(self, params: Optional[Params] = None) -> Dict[str, Any]:
    """The flax variables of the whole classifier (`params` replaces the trained part)."""
    variables = {'params': merge_params(self.params if params is None else params, self.frozen)}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


# --- Trained / frozen split ------------------------------------------------------------------

def split_params(params: Params, is_trained: Callable[[Path], bool]) -> Tuple[Params, Params]:
  """(trained, frozen) nested dicts: the leaves for which `is_trained(path)` is / is not true."""
  flat = traverse_util.flatten_dict(dict(params))
  trained = {p: v for p, v in flat.items() if is_trained(p)}
  frozen = {p: v for p, v in flat.items() if not is_trained(p)}
  return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge_params(trained: Params, frozen: Optional[Params]) -> Params:
  """Inverse of `split_params`."""
  if not frozen:
    return trained
  flat = traverse_util.flatten_dict(dict(frozen))
  flat.update(traverse_util.flatten_dict(dict(trained)))
  return traverse_util.unflatten_dict(flat)


def head_only(path: Path) -> bool:
  """Linear probe: only the head trains (its BatchNorm has no params)."""
  return path[0] == 'head'


def last_blocks_trained(depth: int, num_blocks: Optional[int]) -> Callable[[Path], bool]:
  """Partial fine-tuning: the last `num_blocks` encoder blocks, the final norm
  (fc_norm in global-pool mode, the encoder's `norm` in cls mode) and the head train.
  `num_blocks=None` trains everything (full fine-tuning)."""
  if num_blocks is None:
    return lambda path: True
  check_trainable_blocks(num_blocks, depth)
  first = depth - num_blocks

  def is_trained(path: Path) -> bool:
    if path[0] in ('head', 'fc_norm'):
      return True
    if path[0] == 'encoder' and len(path) > 1:
      if path[1] == 'norm':
        return True
      if path[1].startswith('blocks_'):
        return int(path[1][len('blocks_'):]) >= first
    return False

  return is_trained


def check_trainable_blocks(num_blocks: Any, depth: int) -> None:
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not (
      0 <= num_blocks <= depth):
    raise ValueError(
        f'config.trainable_blocks={num_blocks!r} is outside [0, depth={depth}]: partial '
        f'fine-tuning trains the last k of the {depth} encoder blocks; choose k in 0..{depth} '
        f'(0 = frozen encoder with trained norm and head), or None for full fine-tuning.')


# --- Losses and evaluation -------------------------------------------------------------------

def soft_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """timm's SoftTargetCrossEntropy: mean over the batch of sum(-targets * log_softmax)."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, k: int) -> jnp.ndarray:
  """(B,) 1.0 where the label is among the k highest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def eval_step(state: TrainState, batch: Mapping[str, jnp.ndarray],
              axis_name: Optional[str] = AXIS) -> Dict[str, jnp.ndarray]:
  """Sums over valid examples of loss, top-1 and top-5 hits; psum'd over `axis_name` (pmap),
  or over the global batch it sees (jit, `axis_name=None`)."""
  logits = state.apply_fn(state.variables(), batch['image'], train=False)
  labels = batch['label']
  valid = batch.get('valid', jnp.ones(labels.shape, bool))
  labels = jnp.where(valid, labels, 0)  # padding carries label -1
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  masked_sum = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
  sums = {'loss': masked_sum(loss), 'top1': masked_sum(topk_correct(logits, labels, 1)),
          'top5': masked_sum(topk_correct(logits, labels, 5)),
          'count': jnp.sum(valid.astype(jnp.float32))}
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def summarize_eval(totals: Mapping[str, float]) -> Dict[str, float]:
  """Sums from `eval_step` -> {'top1', 'top5' (percent), 'loss', 'count'}."""
  count = float(totals['count'])
  if count == 0:
    raise ValueError('The evaluation split yielded no valid examples: check '
                     'config.dataset.eval_split and the data directory.')
  return {'top1': 100.0 * float(totals['top1']) / count,
          'top5': 100.0 * float(totals['top5']) / count,
          'loss': float(totals['loss']) / count, 'count': count}


def replicate(tree: Any, devices: Optional[Any] = None) -> Any:
  """Copies `tree` to every local device, laid out as a pmap over AXIS returns it.

  flax's jax_utils.replicate lays arrays out on a mesh named '_device_put_sharded'; a
  pmapped step returns them on a mesh named after its axis, and jax compiles the step a
  second time for that layout. This layout matches the step's output, so it compiles once.
  """
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first local device's copy of a replicated tree, as host NumPy arrays.

  Reads one shard per leaf: no per-shape compiled slicing, no copy of every replica.
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def step_rng(rng: jnp.ndarray, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """The step's key folded with the global index of this device's first example, so the
  randomness of a shard does not depend on which device or host holds it."""
  return jax.random.fold_in(rng, batch['index'][0].astype(jnp.uint32))


# --- Config checks and initialisation --------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
  """Everything that can be wrong in a downstream config, raised before any real work."""
  if config.job not in JOBS:
    raise ValueError(f'config.job={config.job!r} is not a downstream job; use one of {JOBS}.')
  depth = int(config.model.depth)
  if config.job == 'finetune' and config.get('trainable_blocks') is not None:
    check_trainable_blocks(config.trainable_blocks, depth)
  if not config.get('eval_only') and not config.get('init_from') and not config.get(
      'allow_random_init'):
    what = 'linear probe' if config.job == 'linear_probe' else 'fine-tuning run'
    raise ValueError(
        f'The {what} has no pretrained encoder: set --config.init_from=<pretraining workdir or '
        f'checkpoint dir> (e.g. the workdir of `python -m mae_jax.main --config=configs/demo.py`'
        f'), or set --config.allow_random_init=True for a randomly initialised baseline.')


def build_classifier(config: ml_collections.ConfigDict, num_classes: int,
                     bn_axis_name: Optional[str] = AXIS) -> classifier_lib.Classifier:
  """The classifier a downstream config describes."""
  probe = config.job == 'linear_probe'
  return classifier_lib.classifier_from_config(
      config.model, num_classes, global_pool=bool(config.global_pool),
      drop_path_rate=0.0 if probe else float(config.drop_path_rate),
      probe_batch_norm=probe, head_init_std=float(config.head_init_std),
      bn_axis_name=bn_axis_name, remat=bool(config.get('remat', False)))


def model_record(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
  """What a checkpoint's params depend on: the encoder config plus the classifier's layout.

  Stored in checkpoint metadata so that a workdir is never resumed by an incompatible run.
  """
  record = dict(config.model.to_dict())
  record['classifier'] = {'job': config.job, 'num_classes': int(num_classes),
                          'global_pool': bool(config.global_pool),
                          'trainable_blocks': config.get('trainable_blocks')}
  return record


@functools.partial(jax.jit, static_argnums=0)
def init_variables(model: classifier_lib.Classifier, rng: jnp.ndarray) -> Dict[str, Any]:
  """The classifier's fresh variables (compiled once per model configuration)."""
  image = jnp.zeros((1,) + to_2tuple(model.img_size) + (3,), jnp.float32)
  return model.init(rng, image, train=False)


def init_params(model: classifier_lib.Classifier, config: ml_collections.ConfigDict,
                rng: jnp.ndarray, load_params: Callable[[str], Tuple[Any, Any]]
                ) -> Tuple[Params, Dict[str, Any]]:
  """Initial classifier (params, batch_stats): fresh init, encoder from `config.init_from`.

  The checkpoint is read and its shapes checked (naming the first mismatch) before the
  (cheap) real init; `load_params` is checkpoint.load_params.
  """
  ckpt = None
  if config.get('init_from'):
    ckpt_params, ckpt_model_config = load_params(config.init_from)
    abstract = jax.eval_shape(init_variables, model, rng)['params']
    classifier_lib.check_pretrained_encoder(abstract, ckpt_params, str(config.init_from))
    ckpt = (ckpt_params, ckpt_model_config)
  else:
    logging.warning('No config.init_from: the encoder is RANDOMLY initialised (baseline).')
  variables = init_variables(model, rng)
  params = dict(variables['params'])
  if ckpt is not None:
    params = classifier_lib.load_pretrained_encoder(params, *ckpt, model.grid, model.patch_size,
                                                    source=str(config.init_from))
  return params, dict(variables.get('batch_stats', {}))
