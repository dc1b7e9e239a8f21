"""Cutting images into patches and putting them back, in the reference's pixel order.

A patch of size p is flattened as (row, column, channel): the image laid out as
`(h, p, w, q, c)` becomes `(h * w, p * q * c)`. This is the order of the PyTorch
release's `patchify`, so per-patch predictions and targets line up with theirs.
"""
from typing import Tuple, Union

import jax.numpy as jnp

Size2D = Union[int, Tuple[int, int]]


def to_2tuple(size: Size2D) -> Tuple[int, int]:
  """Returns `(height, width)` for an int or a pair."""
  if isinstance(size, int):
    return (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f'Expected an int or a (height, width) pair, got {size!r}.')
  return size


def grid_size(img_size: Size2D, patch_size: int) -> Tuple[int, int]:
  """Number of patches along (height, width); raises if the image does not tile."""
  h, w = to_2tuple(img_size)
  if h % patch_size or w % patch_size:
    raise ValueError(
        f'img_size {(h, w)} is not divisible by patch_size {patch_size}: choose an '
        f'image size that is a multiple of {patch_size} (e.g. {(h // patch_size) * patch_size}).')
  return h // patch_size, w // patch_size


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """(B, H, W, C) images -> (B, L, p*p*C) patches, L = (H/p) * (W/p)."""
  b, h, w, c = images.shape
  gh, gw = grid_size((h, w), patch_size)
  p = patch_size
  x = images.reshape(b, gh, p, gw, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (b, gh, gw, p, q, c)
  return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jnp.ndarray, patch_size: int,
               grid: Union[None, Tuple[int, int]] = None,
               channels: int = 3) -> jnp.ndarray:
  """(B, L, p*p*C) patches -> (B, H, W, C) images; the exact inverse of `patchify`.

  `grid` is (H/p, W/p); when omitted the image is taken to be square.
  """
  b, l, d = patches.shape
  p = patch_size
  if d != p * p * channels:
    raise ValueError(f'Patch dimension {d} != patch_size**2 * channels = {p * p * channels}.')
  if grid is None:
    side = int(round(l ** 0.5))
    if side * side != l:
      raise ValueError(f'{l} patches do not form a square grid: pass grid=(rows, cols).')
    grid = (side, side)
  gh, gw = grid
  if gh * gw != l:
    raise ValueError(f'grid {grid} holds {gh * gw} patches, got {l}.')
  x = patches.reshape(b, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (b, gh, p, gw, q, c)
  return x.reshape(b, gh * p, gw * p, channels)
