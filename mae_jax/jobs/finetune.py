"""End-to-end and partial fine-tuning (MAE's main_finetune.py, and the paper's Figure 9).

The classifier pools the patch tokens (global pool -> fc_norm -> head, head init std
2e-5). AdamW (0.9, 0.999), weight decay 0.05 except for 1-D params, cls token and
position table, layer-wise lr decay (`layer_decay.py`), drop path, mixup/cutmix with
label smoothing and soft-target cross entropy; RandAugment and random erasing come from
the input pipeline (mode 'finetune').

Partial fine-tuning (`config.trainable_blocks = k`): the last k blocks, the final norm
and the head train; everything else sits in `state.frozen`, without gradients or
optimizer state, and stays bit-identical.
"""
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax.jobs import architecture
from mae_jax.jobs import classification
from mae_jax.jobs import layer_decay
from mae_jax.jobs import optim
from mae_jax.jobs.classification import AXIS, TrainState

DATA_MODE = 'finetune'


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   params: Any) -> optax.GradientTransformation:
  """AdamW with the fine-tuning decay mask, then the per-parameter layer-decay lr scale.

  `params` is the trained subtree (its paths decide layers and decay).
  """
  scales = layer_decay.layer_lr_scales(params, int(config.model.depth), config.layer_decay)
  return optax.chain(
      optim.adamw(schedule, params, weight_decay=config.weight_decay, b1=config.b1,
                  b2=config.b2),
      layer_decay.scale_by_tree(scales))


def trained_predicate(config: ml_collections.ConfigDict) -> Callable[[Tuple[str, ...]], bool]:
  """Which params train: all (full fine-tuning) or the last `config.trainable_blocks`."""
  return classification.last_blocks_trained(int(config.model.depth),
                                        config.get('trainable_blocks'))


def create_train_state(model, params: Dict[str, Any], is_trained, tx_factory) -> TrainState:
  """Splits params into trained / frozen and builds the optimizer on the trained part only."""
  trained, frozen = classification.split_params(params, is_trained)
  return TrainState.create(apply_fn=model.apply, params=trained, tx=tx_factory(trained),
                           frozen=frozen, batch_stats={})


def _mix(rng: jnp.ndarray, batch: Mapping[str, jnp.ndarray], num_classes: int,
         mixup: Mapping[str, Any], label_smoothing: float, num_shards: int
         ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Mixup/CutMix of the batch: per device shard (as pmap runs it, also under jit) or per
  group of `mixup['group_size']` examples keyed by global index."""
  from mae_jax.data.mixup import mixup_cutmix  # pylint: disable=g-import-not-at-top
  group_size = mixup.get('group_size')

  def mix(images, labels, index):
    return mixup_cutmix(
        rng if group_size else classification.step_rng(rng, {'index': index}), images, labels,
        num_classes, mixup_alpha=mixup['mixup_alpha'], cutmix_alpha=mixup['cutmix_alpha'],
        switch_prob=mixup['switch_prob'], label_smoothing=label_smoothing,
        group_size=group_size, example_ids=index)

  images, labels, index = batch['image'], batch['label'], batch['index']
  if group_size or num_shards == 1:
    return mix(images, labels, index)
  shards = lambda x: x.reshape((num_shards, -1) + x.shape[1:])
  mixed, targets = jax.vmap(mix)(shards(images), shards(labels), shards(index))
  return mixed.reshape(images.shape), targets.reshape((images.shape[0], num_classes))


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jnp.ndarray, *,
               num_classes: int, mixup: Mapping[str, Any], label_smoothing: float,
               axis_name: Optional[str] = AXIS, num_shards: int = 1
               ) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """One AdamW step on soft targets (mixup/cutmix or smoothed labels).

  Bind `num_classes`, `mixup` (mixup_alpha, cutmix_alpha, switch_prob: alphas 0 = off;
  group_size: None mixes each device's batch on its own as the reference does per GPU,
  an int mixes groups of that many examples keyed by their global index, the same on any
  device count) and `label_smoothing` with functools.partial before compiling. Pmapped it
  averages over `axis_name`; jitted (`axis_name=None`) it sees the global batch of
  `num_shards` device shards.
  """
  mix_rng, drop_rng = jax.random.split(rng)  # drop path: keyed per example below
  images, labels = batch['image'], batch['label']
  if mixup['mixup_alpha'] > 0 or mixup['cutmix_alpha'] > 0:
    images, targets = _mix(mix_rng, batch, num_classes, mixup, label_smoothing, num_shards)
  else:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  frozen = jax.lax.stop_gradient(state.frozen)

  def loss_fn(params):
    logits = state.apply_fn({'params': classification.merge_params(params, frozen)}, images,
                            train=True, example_ids=batch['index'], rngs={'dropout': drop_rng})
    return classification.soft_cross_entropy(logits, targets), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'accuracy': jnp.mean(classification.topk_correct(logits, labels, 1))}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  state = state.apply_gradients(grads=grads)
  return state, metrics


def bound_train_step(config: ml_collections.ConfigDict, num_classes: int, layout=None):
  """`train_step` with the config's augmentation (and the layout's axis) bound, ready to
  compile (`layout` a parallel.Layout; None: pmap)."""
  mixup = {'mixup_alpha': float(config.mixup), 'cutmix_alpha': float(config.cutmix),
           'switch_prob': float(config.mixup_switch_prob),
           'group_size': int(config.mixup_group_size) or None}
  axis = {} if layout is None else {'axis_name': layout.axis_name,
                                     'num_shards': layout.num_shards}
  return functools.partial(train_step, num_classes=num_classes, mixup=mixup,
                           label_smoothing=float(config.label_smoothing), **axis)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Runs (or resumes) full or partial fine-tuning in `workdir`; returns the final eval.

  The encoder's architecture comes from the checkpoint unless `config.model` sets it
  (`mae_jax.jobs.architecture`).
  """
  from mae_jax.jobs import downstream  # pylint: disable=g-import-not-at-top
  config = architecture.resolve(config, architecture.checkpoint_source(config, workdir))
  is_trained = trained_predicate(config)

  def factory(model, params, batch_stats, schedule):
    del batch_stats
    return create_train_state(model, params, is_trained,
                              lambda trained: make_optimizer(config, schedule, trained))

  return downstream.train_and_evaluate(
      config, workdir, data_mode=DATA_MODE, create_train_state=factory,
      train_step=lambda num_classes, layout: bound_train_step(config, num_classes, layout))
