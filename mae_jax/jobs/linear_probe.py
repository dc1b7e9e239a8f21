"""Linear probing (MAE's main_linprobe.py): a linear head on the frozen encoder.

Features are the cls token after the encoder's final norm (the reference default,
`global_pool=False`), normalised by a BatchNorm without affine parameters (eps 1e-6,
statistics over the global batch) and fed to a linear head (trunc-normal std 0.01).
Only the head trains: the encoder sits in `state.frozen`, so the step takes no
gradient for it and the optimizer holds no state for it. LARS as MoCo v3 / MAE
util/lars.py: momentum 0.9, trust coefficient 0.001, weight decay and trust ratio
only for parameters with more than one dimension, base lr 0.1, wd 0, warmup then cosine.
"""
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax.jobs import architecture
from mae_jax.jobs import classification
from mae_jax.jobs.classification import AXIS, TrainState

DATA_MODE = 'linear_probe'


def _multi_dim(params: Any) -> Any:
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
         momentum: float = 0.9, trust_coefficient: float = 0.001
         ) -> optax.GradientTransformation:
  """LARS exactly as MAE's util/lars.py (from MoCo v3).

  For params with ndim > 1: g <- g + wd * p, then g <- g * trust * |p| / |g| (1 where
  either norm is 0). Every param: mu <- momentum * mu + g, p <- p - lr * mu.
  optax.lars differs in one place: it scales by the lr *before* the momentum trace
  (mu accumulates lr-scaled updates), which changes the result whenever the lr changes
  between steps (warmup, cosine); so the chain below puts the lr after the trace.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_multi_dim),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
                   _multi_dim),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


def create_train_state(model, params: Dict[str, Any], batch_stats: Dict[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  """Head trained; encoder (and fc_norm if global pool) frozen, without optimizer state."""
  trained, frozen = classification.split_params(params, classification.head_only)
  return TrainState.create(apply_fn=model.apply, params=trained, tx=tx, frozen=frozen,
                           batch_stats=batch_stats)


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jnp.ndarray,
               axis_name: Optional[str] = AXIS) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """One LARS step on the head; cross entropy on integer labels.

  Pmapped, it averages over `axis_name`; jitted (`axis_name=None`) it sees the global batch.
  """
  del rng  # no randomness: frozen encoder without drop path
  frozen = jax.lax.stop_gradient(state.frozen)

  def loss_fn(params):
    variables = {'params': classification.merge_params(params, frozen),
                 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(variables, batch['image'], train=True,
                                     mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss,
             'accuracy': jnp.mean(classification.topk_correct(logits, batch['label'], 1))}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, metrics


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """LARS with the config's momentum, trust coefficient and weight decay."""
  return lars(schedule, weight_decay=config.weight_decay, momentum=config.momentum,
              trust_coefficient=config.trust_coefficient)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Runs (or resumes) a linear probe in `workdir`; returns the final eval metrics.

  The encoder's architecture comes from the checkpoint unless `config.model` sets it
  (`mae_jax.jobs.architecture`).
  """
  from mae_jax.jobs import downstream  # pylint: disable=g-import-not-at-top
  config = architecture.resolve(config, architecture.checkpoint_source(config, workdir))

  def factory(model, params, batch_stats, schedule):
    return create_train_state(model, params, batch_stats, make_optimizer(config, schedule))

  return downstream.train_and_evaluate(
      config, workdir, data_mode=DATA_MODE, create_train_state=factory,
      train_step=lambda num_classes, layout: functools.partial(
          train_step, axis_name=layout.axis_name))
