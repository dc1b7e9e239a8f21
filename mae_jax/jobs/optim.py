"""Optimiser pieces of the MAE recipes: lr scaling, warmup + cosine or poly, weight-decay mask,
AdamW.

The reference sets the learning rate per iteration (`util/lr_sched.adjust_learning_rate`
called with the fractional epoch), so in steps: linear warmup from 0 over
`warmup_steps`, then `min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * progress))`.

Weight decay follows timm's `add_weight_decay` as the reference pretraining calls it:
parameters with one dimension (biases, LayerNorm scales) and names ending in `bias` are
not decayed. Its skip list is empty in pretraining, so cls and mask tokens ((1, 1, D) in
torch) *are* decayed there; fine-tuning skips `cls_token` and `pos_embed`. Hence
`weight_decay_mask(params, no_decay_names=...)`: the default excludes tokens and position
tables (fine-tuning), the pretraining recipe passes `no_decay_names=()`. Fixed position
tables are not parameters at all.
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any

DEFAULT_NO_DECAY_NAMES = ('cls_token', 'mask_token', 'pos_embed')


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
  """The linear scaling rule of the reference: `lr = base_lr * global_batch / 256`."""
  return base_lr * global_batch_size / 256


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
  """The schedule as a hashable callable, so jitted steps that close over it can be cached."""
  base_lr: float
  warmup_steps: int
  total_steps: int
  min_lr: float = 0.0

  def __call__(self, step):
    step = jnp.asarray(step, jnp.float32)
    warmup = self.base_lr * step / max(self.warmup_steps, 1)
    progress = jnp.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1),
                        0.0, 1.0)
    cosine = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < self.warmup_steps, warmup, cosine)


def warmup_cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                           min_lr: float = 0.0) -> optax.Schedule:
  """Per-step linear warmup from 0 to `base_lr`, then half-cycle cosine down to `min_lr`.

  Args:
    base_lr: the peak (already batch-scaled) learning rate.
    warmup_steps: steps of linear warmup; `lr(s) = base_lr * s / warmup_steps` for s below it.
    total_steps: the step at which the cosine reaches `min_lr`.
    min_lr: the floor of the cosine (0 in pretraining, 1e-6 in fine-tuning).
  """
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f'Need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) '
                     f'and total_steps > 0: shorten the warmup or train longer.')
  return WarmupCosine(float(base_lr), int(warmup_steps), int(total_steps), float(min_lr))


@dataclasses.dataclass(frozen=True)
class WarmupPoly:
  """mmcv's `poly` policy with `linear` warmup, per iteration (the segmentation recipes).

  At step s (updates done before this one): `regular = (base_lr - min_lr) * (1 - s /
  total_steps) ** power + min_lr`; during the first `warmup_steps` it is multiplied by
  `1 - (1 - s / warmup_steps) * (1 - warmup_ratio)` (mmcv's LinearWarmup of the regular lr).
  """
  base_lr: float
  warmup_steps: int
  total_steps: int
  power: float = 1.0
  min_lr: float = 0.0
  warmup_ratio: float = 1e-6

  def __call__(self, step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip(1.0 - step / max(self.total_steps, 1), 0.0, 1.0)
    regular = (self.base_lr - self.min_lr) * progress ** self.power + self.min_lr
    # 1 - (1 - s / w) * (1 - ratio), written so that float32 keeps the small first values.
    factor = self.warmup_ratio + (1.0 - self.warmup_ratio) * step / max(self.warmup_steps, 1)
    return jnp.where(step < self.warmup_steps, regular * factor, regular)


def warmup_poly_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                         power: float = 1.0, min_lr: float = 0.0,
                         warmup_ratio: float = 1e-6) -> optax.Schedule:
  """`WarmupPoly` after checking its arguments (see there)."""
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f'Need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) '
                     f'and total_steps > 0: shorten the warmup or train longer.')
  if power <= 0 or not 0 < warmup_ratio <= 1:
    raise ValueError(f'Need power > 0 (got {power}) and 0 < warmup_ratio <= 1 (got '
                     f'{warmup_ratio}).')
  return WarmupPoly(float(base_lr), int(warmup_steps), int(total_steps), float(power),
                    float(min_lr), float(warmup_ratio))


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def weight_decay_mask(params: PyTree,
                      no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES) -> PyTree:
  """A tree of bools like `params`: True where AdamW applies weight decay.

  False for parameters with ndim <= 1 (biases, LayerNorm scale/bias), for names ending
  in 'bias', and for leaves named in `no_decay_names` (default: cls/mask tokens and
  learned position tables).
  """
  skip = set(no_decay_names)

  def decays(path, leaf) -> bool:
    name = _leaf_name(path)
    return not (jnp.ndim(leaf) <= 1 or name.endswith('bias') or name in skip)

  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(schedule: optax.Schedule, params: PyTree, weight_decay: float = 0.05,
          b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES) -> optax.GradientTransformation:
  """AdamW (torch semantics: decoupled decay scaled by the lr) with the weight-decay mask."""
  return optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=weight_decay_mask(params, no_decay_names))
