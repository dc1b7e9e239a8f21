"""The downstream classifier on the MAE encoder, and loading a pretrained encoder into it.

`Classifier` runs the pretraining `Encoder` (same parameter tree under `encoder`, so
pretrained params drop in) on all patches, with a learned position table, and pools:

- global pool (the fine-tuning default, models_vit.py `global_pool=True`): mean over the
  patch tokens -> `fc_norm` (LayerNorm eps 1e-6) -> `head`; the encoder's final `norm`
  is not created, as the reference deletes it;
- cls token (the linear-probe default): the cls token after the encoder's final `norm`.

With `probe_batch_norm` the features pass a BatchNorm without affine parameters (eps
1e-6, statistics over the global batch) before the linear head, as MAE's linear probe.

`load_pretrained_encoder` copies a checkpoint's encoder into freshly initialised
classifier params, checking every shape first, and interpolates the position table
bicubically (PyTorch's kernel, a = -0.75) when the resolution changes.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mae_jax.model import linear as linear_lib
from mae_jax.model.patches import Size2D, grid_size, to_2tuple
from mae_jax.model.pos_embed import sincos_2d
from mae_jax.model.vit import Encoder

Params = Dict[str, Any]

# Encoder fields of `config.model` that the classifier shares with pretraining.
ENCODER_FIELDS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
                  'layer_norm_eps', 'dtype')


class FeatureBatchNorm(nn.Module):
  """BatchNorm1d(affine=False) with PyTorch's semantics, statistics over all devices.

  Training normalises with the batch mean and biased variance (averaged over
  `axis_name` when given, so the statistics are those of the global batch) and
  updates the running averages with `momentum` (PyTorch convention, 0.1) using the
  unbiased variance, as torch does. Evaluation uses the running averages.
  """
  epsilon: float = 1e-6
  momentum: float = 0.1
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((d,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((d,), jnp.float32))
    x = x.astype(jnp.float32)
    if not train:
      return (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    mean = jnp.mean(x, axis=0)
    mean_sq = jnp.mean(jnp.square(x), axis=0)
    count = x.shape[0]
    if self.axis_name is not None:
      mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
      count = count * jax.lax.psum(1, self.axis_name)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    if not self.is_initializing():
      unbiased = var * count / max(count - 1, 1)
      ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
      ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class Classifier(nn.Module):
  """MAE encoder + pooling + (optional BatchNorm) + linear head.

  Attributes:
    num_classes: head outputs.
    img_size ... dtype: the encoder, as in `config.model` (dtype a name or dtype).
    drop_path_rate: stochastic depth, linear over the blocks (fine-tuning 0.1/0.2/0.3).
    global_pool: True for mean pool -> fc_norm; False for the normed cls token.
    probe_batch_norm: BatchNorm (no affine) before the head, the linear probe.
    head_init_std: trunc-normal std of the head kernel (2e-5 fine-tune, 0.01 probe).
    bn_axis_name: pmap axis over which the BatchNorm statistics are averaged.
    remat: recompute each encoder block in the backward pass (less memory).
  """
  num_classes: int
  img_size: Size2D = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: Any = 'float32'
  drop_path_rate: float = 0.0
  global_pool: bool = True
  probe_batch_norm: bool = False
  head_init_std: float = 2e-5
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @property
  def grid(self) -> Tuple[int, int]:
    return grid_size(self.img_size, self.patch_size)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False,
               example_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """images (B, H, W, C) normalised -> logits (B, num_classes) float32.

    `train` turns on drop path (uses the 'dropout' rng) and batch statistics;
    `example_ids` (B,) global indices key each example's drop path (device-count free).
    """
    dtype = jnp.dtype(self.dtype)
    encoder = Encoder(img_size=self.img_size, patch_size=self.patch_size,
                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, layer_norm_eps=self.layer_norm_eps,
                      drop_path_rate=self.drop_path_rate, learn_pos_embed=True, dtype=dtype,
                      remat=self.remat, name='encoder')
    x = encoder(images, deterministic=not train, final_norm=not self.global_pool,
                example_ids=example_ids)
    if self.global_pool:
      x = jnp.mean(x[:, 1:], axis=1)
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name='fc_norm')(x)
    else:
      x = x[:, 0]
    x = x.astype(jnp.float32)
    if self.probe_batch_norm:
      x = FeatureBatchNorm(epsilon=1e-6, axis_name=self.bn_axis_name, name='head_norm')(x, train)
    head = nn.Dense(self.num_classes, kernel_init=trunc_normal_init(self.head_init_std),
                    bias_init=nn.initializers.zeros, dot_general=linear_lib.dense_dot_general,
                    name='head')
    return head(x)


def trunc_normal_init(std: float):
  """timm's trunc_normal_(std=std): N(0, std) cut at the ABSOLUTE bounds [-2, 2].

  For small std this is a plain normal; flax's truncated_normal instead cuts at 2 std
  and rescales, which would not match.
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
  return init


def classifier_from_config(model_cfg: Mapping[str, Any], num_classes: int, *,
                           global_pool: bool, drop_path_rate: float = 0.0,
                           probe_batch_norm: bool = False, head_init_std: float = 2e-5,
                           bn_axis_name: Optional[str] = None, remat: bool = False
                           ) -> Classifier:
  """Builds the classifier from a pretraining-style `config.model` (decoder fields ignored)."""
  kwargs = {k: model_cfg[k] for k in ENCODER_FIELDS if k in model_cfg}
  if isinstance(kwargs.get('img_size'), (list, tuple)):
    kwargs['img_size'] = tuple(kwargs['img_size'])
  return Classifier(num_classes=num_classes, drop_path_rate=drop_path_rate,
                    global_pool=global_pool, probe_batch_norm=probe_batch_norm,
                    head_init_std=head_init_std, bn_axis_name=bn_axis_name, remat=remat,
                    **kwargs)


# --- Position-table interpolation ------------------------------------------------------------

def _torch_cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out, in) matrix of PyTorch's bicubic resampling along one axis, align_corners=False.

  Source coordinate `(dst + 0.5) * in / out - 0.5` (not clamped, as torch does for
  cubic), Keys' cubic convolution with a = -0.75, taps outside the input clamped to the
  edge (replicate), no antialiasing. Mirrors aten/src/ATen/native/UpSample.h.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for dst in range(out_size):
    src = scale * (dst + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    coeffs = (far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t))
    for offset, c in zip((-1, 0, 1, 2), coeffs):
      weights[dst, min(max(base + offset, 0), in_size - 1)] += c
  return weights


def resize_bicubic_torch(grid_values: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
  """Resizes (H, W, D) like torch F.interpolate(mode='bicubic', align_corners=False).

  jax.image.resize('cubic') differs: it uses a = -0.5 and antialiases when shrinking.
  """
  h, w = grid_values.shape[:2]
  wh = _torch_cubic_weights(h, out_hw[0])
  ww = _torch_cubic_weights(w, out_hw[1])
  out = np.einsum('oh,hwd->owd', wh, np.asarray(grid_values, np.float64))
  return np.einsum('pw,owd->opd', ww, out)


def interpolate_pos_embed(table: np.ndarray, new_grid: Size2D,
                          old_grid: Optional[Size2D] = None,
                          num_extra_tokens: int = 1) -> np.ndarray:
  """Resamples a (1, extra + N, D) position table to another patch grid.

  The extra (cls) rows are kept as they are; the patch rows are resized bicubically as
  MAE's util/pos_embed.py does. `old_grid` defaults to a square grid. The table comes
  back unchanged (bit for bit) when the grid does not change.
  """
  table = np.asarray(table)
  if table.ndim == 2:
    table = table[None]
  n = table.shape[1] - num_extra_tokens
  if old_grid is None:
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f'Position table with {n} patch rows is not a square grid: pass old_grid.')
    old_grid = (side, side)
  old_grid, new_grid = to_2tuple(old_grid), to_2tuple(new_grid)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f'Position table has {n} patch rows but old_grid {old_grid} holds '
                     f'{old_grid[0] * old_grid[1]}.')
  if old_grid == new_grid:
    return table
  extra, patches = table[:, :num_extra_tokens], table[0, num_extra_tokens:]
  patches = patches.reshape(old_grid + (table.shape[-1],))
  resized = resize_bicubic_torch(patches, new_grid).reshape(1, -1, table.shape[-1])
  return np.concatenate([extra, resized.astype(table.dtype)], axis=1)


# --- Loading a pretrained encoder ------------------------------------------------------------

# Checkpoint entries the classifier may not use: the encoder mask token of the
# mask-token-in-encoder ablation, and the final norm in global-pool mode (the reference
# deletes it).
_IGNORED_IN_CHECKPOINT = ('mask_token', 'norm')


def pretrained_encoder(ckpt_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The encoder subtree of an MAE/classifier checkpoint (or the tree itself if bare)."""
  if 'encoder' in ckpt_params:
    return ckpt_params['encoder']
  if 'patch_embed' in ckpt_params:
    return ckpt_params
  raise ValueError(f'The checkpoint holds no encoder params (top-level keys '
                   f'{sorted(ckpt_params)}): point config.init_from at an MAE pretraining '
                   f'workdir or a checkpoint written by checkpoint.save_params.')


def check_pretrained_encoder(params: Params, ckpt_params: Mapping[str, Any],
                             source: str = 'checkpoint') -> None:
  """Raises a ValueError naming the first encoder param whose shape differs or is missing.

  `params` may hold arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
  """
  ckpt_enc = traverse_util.flatten_dict(dict(pretrained_encoder(ckpt_params)), sep='/')
  target = traverse_util.flatten_dict(dict(params['encoder']), sep='/')
  for key, value in target.items():
    if key == 'pos_embed':
      continue
    if key not in ckpt_enc:
      raise ValueError(
          f'encoder/{key} (shape {tuple(value.shape)}) is missing from {source}: the '
          f'checkpoint does not hold an encoder of this architecture. Set config.model to the '
          f'size it was pretrained with (e.g. presets.model_config(...)).')
    if tuple(ckpt_enc[key].shape) != tuple(value.shape):
      raise ValueError(
          f'encoder/{key} has shape {tuple(ckpt_enc[key].shape)} in {source} but '
          f'{tuple(value.shape)} in the config: set config.model (embed_dim, depth, '
          f'patch_size, ...) to the size the checkpoint was pretrained with.')
  unused = [k for k in ckpt_enc if k not in target and k != 'pos_embed'
            and k.split('/')[0] not in _IGNORED_IN_CHECKPOINT]
  if unused:
    raise ValueError(
        f'{source} holds encoder/{unused[0]} (shape {tuple(ckpt_enc[unused[0]].shape)}) that '
        f'the configured encoder lacks ({len(unused)} such params): the checkpoint is deeper or '
        f'differently shaped; set config.model.depth etc. to the pretraining size.')
  if 'pos_embed' in ckpt_enc and ckpt_enc['pos_embed'].shape[-1] != target['pos_embed'].shape[-1]:
    raise ValueError(
        f'encoder/pos_embed has width {ckpt_enc["pos_embed"].shape[-1]} in {source} but '
        f'{target["pos_embed"].shape[-1]} in the config: set config.model to the pretraining size.')


def load_pretrained_encoder(params: Params, ckpt_params: Mapping[str, Any],
                            ckpt_model_config: Optional[Mapping[str, Any]],
                            new_grid: Tuple[int, int], patch_size: int,
                            source: str = 'checkpoint') -> Params:
  """Returns `params` with `params['encoder']` replaced by the checkpoint's encoder.

  Every encoder parameter of the classifier must be in the checkpoint with the same
  shape (`check_pretrained_encoder`). The position table is taken from the checkpoint
  when it holds one (converted PyTorch releases), else it is the fixed sin-cos table of
  the pretraining grid; either way it is interpolated to `new_grid` when the grids
  differ. The head and fc_norm keep their init, as in the reference.
  """
  check_pretrained_encoder(params, ckpt_params, source)
  ckpt_enc = traverse_util.flatten_dict(dict(pretrained_encoder(ckpt_params)), sep='/')
  target = traverse_util.flatten_dict(dict(params['encoder']), sep='/')
  new = {k: jnp.asarray(ckpt_enc[k], target[k].dtype) for k in target if k != 'pos_embed'}
  new['pos_embed'] = jnp.asarray(
      _pretrained_pos_table(ckpt_enc, ckpt_model_config, target['pos_embed'].shape[-1],
                            new_grid, patch_size), target['pos_embed'].dtype)
  out = dict(params)
  out['encoder'] = traverse_util.unflatten_dict(new, sep='/')
  return out


def encoder_for_grid(ckpt_params: Mapping[str, Any],
                     ckpt_model_config: Optional[Mapping[str, Any]], new_grid: Size2D,
                     patch_size: int) -> Params:
  """A checkpoint's encoder tree for a frozen encoder on another patch grid (resolution).

  As `load_pretrained_encoder` loads it into the classifier: the stored position table, or
  the sin-cos table of the pretraining grid, resampled bicubically to `new_grid` and put
  in as `pos_embed` (an encoder built with `learn_pos_embed=True` reads it). The tree comes
  back unchanged when it stores no table and the grid is the pretraining one.
  """
  enc = dict(pretrained_encoder(ckpt_params))
  new_grid = to_2tuple(new_grid)
  old_grid = None
  if ckpt_model_config and ckpt_model_config.get('img_size') is not None:
    old_grid = grid_size(to_2tuple(ckpt_model_config['img_size']),
                         int(ckpt_model_config.get('patch_size', patch_size)))
  if 'pos_embed' not in enc and old_grid in (None, new_grid):
    return enc
  embed_dim = int(np.shape(enc['cls_token'])[-1])
  enc['pos_embed'] = _pretrained_pos_table(enc, ckpt_model_config, embed_dim, new_grid,
                                           patch_size)
  return enc


def _pretrained_pos_table(ckpt_enc: Mapping[str, Any],
                          ckpt_model_config: Optional[Mapping[str, Any]], embed_dim: int,
                          new_grid: Tuple[int, int], patch_size: int) -> np.ndarray:
  old_grid = None
  if ckpt_model_config and ckpt_model_config.get('img_size') is not None:
    old_grid = grid_size(to_2tuple(ckpt_model_config['img_size']),
                         int(ckpt_model_config.get('patch_size', patch_size)))
  if 'pos_embed' in ckpt_enc:
    table = np.asarray(ckpt_enc['pos_embed'], np.float32)
    if table.ndim == 2:
      table = table[None]
    n = table.shape[1] - 1
    if old_grid is None or old_grid[0] * old_grid[1] != n:
      old_grid = None  # square, as the reference assumes
  else:
    # Pretraining keeps the sin-cos table fixed (not a param): rebuild it on the
    # pretraining grid, then resample like the reference resamples its stored table.
    table = sincos_2d(embed_dim, old_grid or new_grid, cls_token=True)[None]
  return interpolate_pos_embed(table, new_grid, old_grid)
