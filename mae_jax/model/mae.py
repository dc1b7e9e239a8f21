"""The Masked Autoencoder: encoder on visible patches, lightweight decoder, masked-pixel loss.

Public call (the jobs, the converter and outside checks rely on it):

    model = MaskedAutoencoder(**config.model)
    loss, pred, mask = model.apply({'params': params}, images, mask_ratio=0.75,
                                   noise=None, rngs={'mask': key})

`images` are NHWC float32, already normalised; `pred` is (B, L, p*p*C) in patchify
order and `mask` (B, L) with 1 = removed.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.model import masking as masking_lib
from mae_jax.model.patches import Size2D, grid_size, patchify, to_2tuple
from mae_jax.model.pos_embed import sincos_2d
from mae_jax.model.vit import Encoder, block_class, dense, layer_norm, token_init


def _check_heads(width_field: str, width: int, heads_field: str, heads: int) -> None:
  if heads <= 0 or width % heads:
    raise ValueError(f'{width_field}={width} is not divisible by {heads_field}={heads}: '
                     f'choose a width that is a multiple of the number of heads.')


def _check_sincos_width(field: str, width: int) -> None:
  if width <= 0 or width % 4:
    raise ValueError(f'{field}={width} must be a positive multiple of 4 (the 2-D sin-cos '
                     f'position table splits it into four equal parts).')


def mae_loss(images: jnp.ndarray, pred: jnp.ndarray, mask: jnp.ndarray, patch_size: int,
             norm_pix_loss: bool = False) -> jnp.ndarray:
  """Per-patch MSE averaged over removed patches only.

  With `norm_pix_loss` each target patch is normalised by its own mean and unbiased
  (ddof=1) variance: `(t - mean) / sqrt(var + 1e-6)`, as in the reference.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def normalize_patches(patches: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """The norm-pix target: each patch minus its mean over its unbiased std (ddof=1)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


class Decoder(nn.Module):
  """Width projection, mask tokens, unshuffle, fixed positions, blocks, norm, pixel head."""
  grid: Tuple[int, int]
  patch_size: int
  out_chans: int = 3
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, latent: jnp.ndarray, ids_restore: Optional[jnp.ndarray]) -> jnp.ndarray:
    """latent (B, 1 + K, D_enc) -> pred (B, L, p*p*C).

    `ids_restore` None means the encoder already saw all L tokens in patch order.
    """
    x = dense(self.embed_dim, self.dtype, 'embed')(latent)
    b = x.shape[0]
    if ids_restore is not None:
      mask_token = self.param('mask_token', token_init, (1, 1, self.embed_dim))
      num_patches = ids_restore.shape[1]
      num_masked = num_patches + 1 - x.shape[1]
      tokens = jnp.concatenate(
          [x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (b, num_masked, self.embed_dim))],
          axis=1)
      x = jnp.concatenate([x[:, :1], masking_lib.gather_tokens(tokens, ids_restore)], axis=1)
    x = x + jnp.asarray(sincos_2d(self.embed_dim, self.grid, cls_token=True)[None], x.dtype)
    block = block_class(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, 0.0, self.layer_norm_eps, self.dtype,
                name=f'blocks_{i}')(x, True, None)  # positional: remat's static argument
    x = layer_norm(self.layer_norm_eps, self.dtype, 'norm')(x)
    x = dense(self.patch_size ** 2 * self.out_chans, self.dtype, 'pred')(x)
    return x[:, 1:].astype(jnp.float32)


class MaskedAutoencoder(nn.Module):
  """MAE with a ViT encoder (params under `encoder`) and a lightweight decoder (`decoder`).

  Attributes mirror `config.model`: image and patch size, encoder and decoder widths,
  depths and heads, `norm_pix_loss`, the default `mask_ratio`, and
  `mask_token_in_encoder` for the paper's slow baseline that feeds mask tokens through
  the encoder. `dtype` is the compute dtype ('float32' or 'bfloat16'); parameters stay
  float32. `remat` recomputes every block's activations in the backward pass (less memory,
  about one more forward of compute; same params and results): the jobs set it from
  `config.remat`, outside `config.model`, since the params do not depend on it.
  """
  img_size: Size2D = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = False
  mask_ratio: float = 0.75
  mask_token_in_encoder: bool = False
  layer_norm_eps: float = 1e-6
  dtype: Any = 'float32'
  remat: bool = False

  def __post_init__(self):
    if self.patch_size <= 0:
      raise ValueError(f'patch_size must be positive, got {self.patch_size}.')
    try:
      grid_size(self.img_size, self.patch_size)
    except ValueError as e:
      raise ValueError(f'img_size / patch_size: {e}') from None
    _check_heads('embed_dim', self.embed_dim, 'num_heads', self.num_heads)
    _check_heads('decoder_embed_dim', self.decoder_embed_dim,
                 'decoder_num_heads', self.decoder_num_heads)
    _check_sincos_width('embed_dim', self.embed_dim)
    _check_sincos_width('decoder_embed_dim', self.decoder_embed_dim)
    try:
      masking_lib.check_mask_ratio(self.mask_ratio)
    except ValueError as e:
      raise ValueError(f'mask_ratio: {e}') from None
    super().__post_init__()

  @property
  def grid(self) -> Tuple[int, int]:
    return grid_size(self.img_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.encoder = Encoder(
        img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
        depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        layer_norm_eps=self.layer_norm_eps, mask_token_in_encoder=self.mask_token_in_encoder,
        dtype=dtype, remat=self.remat)
    self.decoder = Decoder(
        grid=self.grid, patch_size=self.patch_size, out_chans=self.in_chans,
        embed_dim=self.decoder_embed_dim, depth=self.decoder_depth,
        num_heads=self.decoder_num_heads, mlp_ratio=self.mlp_ratio,
        layer_norm_eps=self.layer_norm_eps, dtype=dtype, remat=self.remat)

  def _check_images(self, images: jnp.ndarray) -> None:
    expected = to_2tuple(self.img_size) + (self.in_chans,)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f'images must be NHWC of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) '
          f'to match config.model (img_size={self.img_size}, in_chans={self.in_chans}), got '
          f'{tuple(images.shape)}. Resize the input or change config.model.img_size.')

  def mask(self, batch_size: int, mask_ratio: Optional[float] = None,
           noise: Optional[jnp.ndarray] = None,
           example_ids: Optional[jnp.ndarray] = None) -> masking_lib.Masking:
    """Draws the masking for a batch (uses the 'mask' rng unless `noise` is given)."""
    ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    rng = None if noise is not None else self.make_rng('mask')
    return masking_lib.random_masking(batch_size, self.num_patches, ratio, rng=rng,
                                      example_ids=example_ids, noise=noise)

  def __call__(self, images: jnp.ndarray, mask_ratio: Optional[float] = None,
               noise: Optional[jnp.ndarray] = None,
               example_ids: Optional[jnp.ndarray] = None
               ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Returns `(loss, pred, mask)`.

    Args:
      images: (B, H, W, C) normalised float images.
      mask_ratio: fraction of patches removed; defaults to `self.mask_ratio`.
      noise: optional (B, L) noise whose ascending argsort is the shuffle (reference semantics).
      example_ids: (B,) global example indices that key each example's mask; defaults
        to `arange(B)`. Pass them so masks do not depend on how a batch is split.
    """
    self._check_images(images)
    masking = self.mask(images.shape[0], mask_ratio, noise, example_ids)
    latent = self.encoder(images, masking)
    ids_restore = None if self.mask_token_in_encoder else masking.ids_restore
    pred = self.decoder(latent, ids_restore)
    loss = mae_loss(images, pred, masking.mask, self.patch_size, self.norm_pix_loss)
    return loss, pred, masking.mask
