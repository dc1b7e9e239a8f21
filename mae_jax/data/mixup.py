"""timm's Mixup / CutMix with label smoothing, as a pure JAX function of (rng, batch).

The MAE release fine-tunes with timm `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
switch_prob=0.5, mode='batch', label_smoothing=0.1)`. In 'batch' mode one draw serves the
whole batch it is given: with probability `switch_prob` CutMix with lam ~ Beta(1, 1),
else Mixup with lam ~ Beta(0.8, 0.8); every example i is mixed with example B-1-i
(`x.flip(0)`); CutMix pastes one box whose area follows lam and then recomputes lam from
the clipped box (timm's `correct_lam`). Targets are `lam * smooth(y) + (1 - lam) *
smooth(y.flip(0))` with off value `smoothing / num_classes` and on value
`1 - smoothing + off`.

Mixing only pairs examples inside the batch it sees. The reference runs it on each GPU's
own 32 images (batch 1024 = 32 GPUs x 32), each GPU with its own lam. Applied per device
in a pmapped step, the pairing therefore depends on the per-device batch. Pass
`group_size` (and the global `example_ids`) to make it independent of the device count:
the batch is cut into consecutive groups of `group_size` examples, each group mixed on
its own with a key folded from its global group index. group_size=32 reproduces the
reference's per-GPU pairing on any number of devices, as long as the per-device batch is
a multiple of it.
"""
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
  """One batch's draw. `weight` (H, W) is the share of the example itself per pixel
  (lam everywhere for Mixup, 0 inside the box and 1 outside for CutMix); `lam` is the
  share used for the targets (box-corrected for CutMix); `box` = (y0, y1, x0, x1)."""
  lam: jnp.ndarray
  use_cutmix: jnp.ndarray
  weight: jnp.ndarray
  box: Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]


def smooth_one_hot(labels: jnp.ndarray, num_classes: int, smoothing: float) -> jnp.ndarray:
  """timm's smoothed one-hot: `smoothing / K` everywhere, `1 - smoothing + smoothing / K`
  at the label."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  hot = labels[:, None] == jnp.arange(num_classes)[None, :]
  return jnp.where(hot, on_value, off_value).astype(jnp.float32)


def sample_mix_params(rng: jax.Array, height: int, width: int, mixup_alpha: float = 0.8,
                      cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                      prob: float = 1.0) -> MixParams:
  """Draws timm's per-batch mixing parameters (`_params_per_batch` + `rand_bbox`)."""
  k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  if mixup_alpha > 0 or cutmix_alpha > 0:
    # Beta(a, a) = G1 / (G1 + G2) = sigmoid(log G1 - log G2), with a of the chosen mode:
    # one log-space Gamma draw, stable for small a and cheaper to compile than two Betas.
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
    log_gamma = jax.random.loggamma(k_lam, alpha, shape=(2,))
    lam = jax.nn.sigmoid(log_gamma[0] - log_gamma[1])
    if prob < 1.0:
      lam = jnp.where(jax.random.uniform(k_apply) < prob, lam, 1.0)
  else:
    lam = jnp.float32(1)

  # rand_bbox: a box of (int(H sqrt(1-lam)), int(W sqrt(1-lam))) centred uniformly, clipped.
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  box_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

  weight = jnp.where(use_cutmix, jnp.where(in_box, 0.0, 1.0), lam)
  lam = jnp.where(use_cutmix, box_lam, lam)
  return MixParams(lam=lam, use_cutmix=use_cutmix, weight=weight, box=(y0, y1, x0, x1))


def _mix(rng, images, labels, num_classes, mixup_alpha, cutmix_alpha, switch_prob,
         label_smoothing, prob):
  params = sample_mix_params(rng, images.shape[1], images.shape[2], mixup_alpha, cutmix_alpha,
                             switch_prob, prob)
  w = params.weight[None, :, :, None].astype(images.dtype)
  mixed = w * images + (1 - w) * images[::-1]
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  targets = targets * params.lam + targets[::-1] * (1.0 - params.lam)
  return mixed, targets


def mixup_cutmix(rng: jax.Array, images: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, *,
                 prob: float = 1.0, group_size: Optional[int] = None,
                 example_ids: Optional[jnp.ndarray] = None
                 ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """timm Mixup/CutMix in 'batch' mode, with label smoothing. Jit- and pmap-safe.

  Args:
    rng: PRNG key; one draw (lam, mixup or cutmix, box) per batch, or per group.
    images: (B, H, W, C) float.
    labels: (B,) int class indices.
    num_classes: K, the width of the soft targets.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that mode.
    switch_prob: probability of CutMix when both are enabled.
    label_smoothing: timm's smoothing (0.1 in MAE).
    prob: probability that a batch (group) is mixed at all (timm's `prob`).
    group_size: None mixes the whole batch given (timm). An int cuts the batch into
      consecutive groups of that many examples, each mixed on its own (see module doc).
    example_ids: (B,) global example indices; with `group_size`, group g uses
      `fold_in(rng, example_ids[g * group_size] // group_size)`, so the result does not
      depend on how the global batch is split over devices. Defaults to arange(B).
  Returns:
    (mixed images (B, H, W, C), soft targets (B, K) float32, rows summing to 1).
  """
  if images.ndim != 4:
    raise ValueError(f'images must be (B, H, W, C), got shape {images.shape}.')
  batch = images.shape[0]
  if labels.shape != (batch,):
    raise ValueError(f'labels must be ({batch},) class indices, got shape {labels.shape}: '
                     'pass integer labels, not one-hot targets.')
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got '
                     f'{mixup_alpha}, {cutmix_alpha}: MAE uses 0.8 and 1.0.')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}: MAE uses 0.1.')
  group = batch if group_size is None else int(group_size)
  if group <= 0 or batch % group:
    raise ValueError(f'group_size {group_size} must divide the batch of {batch}: choose a '
                     'divisor of the per-device batch, or None for the whole batch.')
  if group % 2:
    raise ValueError(f'Mixup pairs example i with example {group}-1-i, so each batch (group) '
                     f'must be even, got {group}: use an even per-device batch or group_size.')
  args = (num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing, prob)
  if group_size is None:
    return _mix(rng, images, labels, *args)

  num_groups = batch // group
  if example_ids is None:
    example_ids = jnp.arange(batch)
  group_ids = example_ids.reshape(num_groups, group)[:, 0] // group
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, group_ids)
  mixed, targets = jax.vmap(lambda k, x, y: _mix(k, x, y, *args))(
      keys, images.reshape(num_groups, group, *images.shape[1:]),
      labels.reshape(num_groups, group))
  return mixed.reshape(images.shape), targets.reshape(batch, num_classes)
