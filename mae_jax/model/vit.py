"""Vision Transformer layers as the MAE release builds them (timm's ViT blocks).

Pre-norm blocks, LayerNorm eps 1e-6, fused qkv projection with bias, exact (erf) GELU,
MLP ratio 4, xavier-uniform Linear weights (on the fused qkv the fan is (D, 3D), as in
the reference), zero biases. Parameter names follow the official checkpoint layout
(`blocks_{i}/attn/qkv`, `norm1`, `mlp/fc1`, ...) so converting weights is a transpose.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.model import linear as linear_lib
from mae_jax.model import masking as masking_lib
from mae_jax.model.patches import Size2D, grid_size, patchify
from mae_jax.model.pos_embed import sincos_2d

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()
# The reference initialises the patch conv as xavier on its (D, C*p*p) view.
patch_embed_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=xavier_uniform,
                  bias_init=nn.initializers.zeros, dot_general=linear_lib.dense_dot_general,
                  name=name)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = dense(3 * d, self.dtype, 'qkv')(x)
    # Output features are laid out (3, heads, head_dim), as torch's reshape(B, N, 3, H, hd).
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, hd)
    q = q * (head_dim ** -0.5)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, d)
    return dense(d, self.dtype, 'proj')(out)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """Exact GELU as torch computes it, `0.5 * x * (1 + erf(x / sqrt(2)))`.

  `nn.gelu(approximate=False)` gives the same function through erfc, whose XLA CPU
  expansion (two rational branches and an exp) costs several times erf's single one.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    x = dense(self.hidden_dim, self.dtype, 'fc1')(x)
    x = gelu(x)
    return dense(d, self.dtype, 'fc2')(x)


class DropPath(nn.Module):
  """Stochastic depth per example (timm's drop_path): zero a residual branch, rescale the rest.

  With `example_ids` (global indices) each example's draw is keyed by its index, so it does
  not depend on the device count or on where the example sits in the batch.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool,
               example_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng('dropout')
    if example_ids is None:
      mask = jax.random.bernoulli(rng, keep, (x.shape[0],))
    else:
      mask = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(rng, i), keep))(
          example_ids.astype(jnp.uint32))
    mask = mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True,
               example_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    d = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = layer_norm(self.layer_norm_eps, self.dtype, 'norm1')(x)
    x = x + drop(Attention(self.num_heads, self.dtype, name='attn')(y), deterministic,
                 example_ids)
    y = layer_norm(self.layer_norm_eps, self.dtype, 'norm2')(x)
    x = x + drop(Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(y), deterministic,
                 example_ids)
    return x


def block_class(remat: bool):
  """`Block`, or `Block` that stores only its input and recomputes the rest for the backward
  pass (activation rematerialisation: memory for compute; the params and results are the
  same). `deterministic` (argument 2, counting the module) stays a Python bool."""
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


class PatchEmbed(nn.Module):
  """Linear embedding of non-overlapping p x p patches (the reference's stride-p conv).

  The kernel is stored in conv layout (p, p, C, D), HWIO, but applied as one matmul on
  patchified pixels, which is the same arithmetic and faster than a strided conv.
  """
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    p, c = self.patch_size, images.shape[-1]
    kernel = self.param('kernel', patch_embed_init, (p, p, c, self.embed_dim))
    bias = self.param('bias', nn.initializers.zeros, (self.embed_dim,))
    x = patchify(images.astype(self.dtype), p)
    x = linear_lib.linear(x, kernel.reshape(p * p * c, self.embed_dim).astype(self.dtype))
    return x + bias.astype(self.dtype)


class Encoder(nn.Module):
  """The MAE / ViT encoder: patch embedding, fixed sin-cos positions, cls token, blocks, norm.

  With `masking` given it runs on the kept tokens only (MAE pretraining); without, on
  all patches (downstream jobs). Downstream jobs that fine-tune the position table set
  `learn_pos_embed=True` and get a `pos_embed` parameter initialised from the table.
  """
  img_size: Size2D = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  drop_path_rate: float = 0.0
  learn_pos_embed: bool = False
  mask_token_in_encoder: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @property
  def grid(self) -> Tuple[int, int]:
    return grid_size(self.img_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  def pos_table(self) -> jnp.ndarray:
    """(1, 1 + L, D) position table, cls row first (zeros unless learned)."""
    table = sincos_2d(self.embed_dim, self.grid, cls_token=True)[None]
    if self.learn_pos_embed:
      return self.param('pos_embed', lambda *_: jnp.asarray(table), table.shape)
    return jnp.asarray(table)

  @nn.compact
  def __call__(self, images: jnp.ndarray, masking: Optional[masking_lib.Masking] = None,
               deterministic: bool = True, final_norm: bool = True,
               example_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """images (B, H, W, C) -> tokens (B, 1 + K, D), cls first.

    K is the number of kept patches when `masking` is given, else all L patches. With
    `mask_token_in_encoder`, removed patches are replaced by a learned mask token and
    all L patches go through the encoder (the paper's slow baseline).
    `final_norm=False` returns the block output without the final LayerNorm (global-pool
    fine-tuning uses its own `fc_norm`, and then `norm` has no parameters).
    `example_ids` (B,) global indices key each example's drop-path draws (see DropPath).
    """
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name='patch_embed')(images)
    pos = self.pos_table().astype(self.dtype)
    cls = self.param('cls_token', token_init, (1, 1, self.embed_dim))
    if masking is not None:
      if self.mask_token_in_encoder:
        mask_token = self.param('mask_token', token_init, (1, 1, self.embed_dim))
        x = jnp.where(masking.mask[..., None] > 0, mask_token.astype(self.dtype), x)
        x = x + pos[:, 1:]
      else:
        x = masking_lib.gather_tokens(x + pos[:, 1:], masking.ids_keep)
    else:
      x = x + pos[:, 1:]
    cls = (cls.astype(self.dtype) + pos[:, :1])
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
    block = block_class(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, float(dpr[i]), self.layer_norm_eps,
                self.dtype, name=f'blocks_{i}')(x, deterministic, example_ids)
    if final_norm:
      x = layer_norm(self.layer_norm_eps, self.dtype, 'norm')(x)
    return x
