"""The MAE encoder as a multi-scale backbone: ViTDet's simple feature pyramid.

`ViTBackbone` runs the pretraining `Encoder` (same parameter tree under `encoder`, so
pretrained params drop in; `classifier.load_pretrained_encoder` loads them and
interpolates the position table) on ALL patches of the input, with a learned position
table and no final LayerNorm, and turns the last block's map, at stride `patch_size`,
into a pyramid as ViTDet does (Li et al., "Exploring Plain Vision Transformer Backbones for
Object Detection", detectron2's `SimpleFeaturePyramid`):

- a finer level (stride s < p) is reached by log2(p / s) 2x2 stride-2 transposed convs,
  each halving the width, with LayerNorm + GELU between them (for p = 16, stride 4 is
  deconv -> LN -> GELU -> deconv, stride 8 one deconv);
- the level at stride p is the map itself;
- a coarser level (s > p) is a max pool with window and stride s / p;
- every level then passes a 1x1 conv to `out_channels` + LayerNorm and a 3x3 conv +
  LayerNorm (no conv biases, detectron2's `c2_xavier_fill` init: uniform, variance
  1 / fan_in). LayerNorms act on the channels of each position, eps 1e-6.

Levels are named as detectron2 names them, 'p{log2(stride)}': strides (4, 8, 16, 32)
give 'p2', 'p3', 'p4', 'p5', each `(B, H / s, W / s, out_channels)`. Strides must be the
patch size times a power of two (patch 16 or 8: 4..32; patch 14 has no stride 4). The
cls token takes part in attention, as in pretraining, and is dropped from the map.
"""
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.model.patches import Size2D, grid_size, to_2tuple
from mae_jax.model.vit import Encoder

STRIDES = (4, 8, 16, 32)
# The encoder fields of a pretraining-style `config.model` that the backbone takes.
ENCODER_FIELDS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
                  'layer_norm_eps', 'dtype')
# detectron2's c2_xavier_fill: kaiming_uniform(a=1), i.e. uniform with variance 1 / fan_in.
c2_xavier_fill = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def level_name(stride: int) -> str:
  """'p2' for stride 4, 'p3' for 8, ...: detectron2's names of pyramid levels."""
  return f'p{int(round(math.log2(stride)))}'


def pyramid_plan(patch_size: int, strides: Sequence[int]) -> Tuple[Tuple[str, int], ...]:
  """Per stride: ('up', number of 2x transposed convs), ('identity', 0) or ('down', window).

  Raises a ValueError naming the stride when it is not `patch_size * 2**k`.
  """
  if not strides:
    raise ValueError('The pyramid needs at least one stride, e.g. strides=(4, 8, 16, 32).')
  if list(strides) != sorted(set(strides)):
    raise ValueError(f'Pyramid strides {tuple(strides)} must be distinct and ascending.')
  plan = []
  for s in strides:
    s = int(s)
    ratio = max(s, patch_size) / max(min(s, patch_size), 1)
    times = int(round(math.log2(ratio)))
    if s <= 0 or max(s, patch_size) % min(s, patch_size) or 2 ** times != ratio:
      valid = sorted({int(v) for v in (patch_size * 2.0 ** k for k in range(-3, 3))
                      if v >= 1 and v.is_integer()})
      raise ValueError(
          f'Pyramid stride {s} is not patch_size ({patch_size}) times a power of two: the '
          f'simple pyramid reaches strides by 2x transposed convs and pooling from the '
          f'patch grid. Choose strides among {valid}.')
    if s < patch_size:
      plan.append(('up', times))
    elif s == patch_size:
      plan.append(('identity', 0))
    else:
      plan.append(('down', s // patch_size))
  return tuple(plan)


def channel_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  """LayerNorm over the channels of each position (detectron2's 'LN' for conv maps)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


class PyramidLevel(nn.Module):
  """One level of the simple pyramid from the stride-p map (see the module docstring)."""
  kind: str
  times: int
  out_channels: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    if self.kind == 'up':
      for i in range(self.times):
        if i:
          x = nn.gelu(channel_norm(self.eps, self.dtype, f'up_norm_{i - 1}')(x),
                      approximate=False)
        width = max(width // 2, 1)
        x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), padding='VALID', dtype=self.dtype,
                             name=f'up_{i}')(x)
    elif self.kind == 'down':
      x = nn.max_pool(x, (self.times, self.times), strides=(self.times, self.times))
    x = nn.Conv(self.out_channels, (1, 1), use_bias=False, kernel_init=c2_xavier_fill,
                dtype=self.dtype, name='lateral')(x)
    x = channel_norm(self.eps, self.dtype, 'lateral_norm')(x)
    x = nn.Conv(self.out_channels, (3, 3), padding=1, use_bias=False,
                kernel_init=c2_xavier_fill, dtype=self.dtype, name='output')(x)
    return channel_norm(self.eps, self.dtype, 'output_norm')(x)


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple pyramid on a (B, H/p, W/p, D) map: {'p2': (B, H/4, W/4, C), ...}."""
  patch_size: int
  out_channels: int = 256
  strides: Tuple[int, ...] = STRIDES
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    out = {}
    for stride, (kind, times) in zip(self.strides, pyramid_plan(self.patch_size, self.strides)):
      name = level_name(stride)
      out[name] = PyramidLevel(kind, times, self.out_channels, self.layer_norm_eps, self.dtype,
                               name=name)(x)
    return out


def backbone_features(module: Any, images: jnp.ndarray, train: bool,
                      example_ids: Optional[jnp.ndarray]) -> Dict[str, jnp.ndarray]:
  """The encoder + pyramid of `module` (a ViTBackbone or subclass), created inside its
  compact method so that their params sit at its top level ('encoder', 'pyramid')."""
  dtype = jnp.dtype(module.dtype)
  encoder = Encoder(img_size=module.img_size, patch_size=module.patch_size,
                    embed_dim=module.embed_dim, depth=module.depth, num_heads=module.num_heads,
                    mlp_ratio=module.mlp_ratio, layer_norm_eps=module.layer_norm_eps,
                    drop_path_rate=module.drop_path_rate, learn_pos_embed=True, dtype=dtype,
                    remat=module.remat, name='encoder')
  expected = to_2tuple(module.img_size)
  if tuple(images.shape[1:3]) != expected:
    raise ValueError(f'The backbone is built for {expected} images (img_size), got '
                     f'{tuple(images.shape[1:3])}: set img_size to the input size.')
  tokens = encoder(images, deterministic=not train, final_norm=False, example_ids=example_ids)
  gh, gw = grid_size(module.img_size, module.patch_size)
  grid = tokens[:, 1:].reshape(tokens.shape[0], gh, gw, tokens.shape[-1])  # drop cls
  return SimpleFeaturePyramid(module.patch_size, module.out_channels, tuple(module.strides),
                              module.layer_norm_eps, dtype, name='pyramid')(grid)


class ViTBackbone(nn.Module):
  """The MAE encoder on all patches + ViTDet's simple feature pyramid.

  Attributes:
    img_size ... dtype: the encoder, as in `config.model` (dtype a name or a dtype).
    out_channels: width of every pyramid level (ViTDet: 256).
    strides: the levels' strides in pixels, ascending (default 4, 8, 16, 32).
    drop_path_rate: stochastic depth in the encoder, linear over the blocks.
    remat: recompute each encoder block in the backward pass (less memory).

  Call: `backbone.apply({'params': p}, images, train=False, example_ids=None)` ->
  {'p2': (B, H/4, W/4, C), 'p3': ..., 'p4': ..., 'p5': ...} in `dtype`. `train` turns on
  drop path (the 'dropout' rng), `example_ids` (B,) global indices key it per example.
  """
  img_size: Size2D = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: Any = 'float32'
  out_channels: int = 256
  strides: Tuple[int, ...] = STRIDES
  drop_path_rate: float = 0.0
  remat: bool = False

  @property
  def level_names(self) -> Tuple[str, ...]:
    return tuple(level_name(s) for s in self.strides)

  @property
  def grid(self) -> Tuple[int, int]:
    return grid_size(self.img_size, self.patch_size)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False,
               example_ids: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
    return backbone_features(self, images, train, example_ids)


def encoder_kwargs(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
  """The encoder fields of a pretraining-style `config.model` (decoder fields dropped)."""
  kwargs = {k: model_cfg[k] for k in ENCODER_FIELDS if k in model_cfg}
  if isinstance(kwargs.get('img_size'), (list, tuple)):
    kwargs['img_size'] = tuple(int(s) for s in kwargs['img_size'])
  return kwargs


def backbone_from_config(model_cfg: Mapping[str, Any], *, out_channels: int = 256,
                         strides: Sequence[int] = STRIDES, drop_path_rate: float = 0.0,
                         remat: bool = False) -> ViTBackbone:
  """A `ViTBackbone` for the encoder a pretraining `config.model` describes.

  Checks the strides against the patch size at once (`pyramid_plan`).
  """
  kwargs = encoder_kwargs(model_cfg)
  pyramid_plan(int(kwargs.get('patch_size', 16)), tuple(strides))
  return ViTBackbone(out_channels=int(out_channels), strides=tuple(int(s) for s in strides),
                     drop_path_rate=float(drop_path_rate), remat=bool(remat), **kwargs)
