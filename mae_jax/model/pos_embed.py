"""Fixed 2-D sine-cosine position tables, laid out exactly as the MAE release lays them out.

Layout (MAE.md section 2): the grid comes from `meshgrid(w, h)`, so the first D/2
channels encode the column index and the last D/2 the row index; within each half,
`omega = 1 / 10000 ** (arange(D/4) / (D/4))` and all sines come before all cosines.
The optional cls row is all zeros. Tables are computed once in float64 with NumPy,
as the reference does, and returned as float32.
"""
from typing import Tuple, Union

import numpy as np

from mae_jax.model.patches import to_2tuple


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, embed_dim) table: sin(pos * omega) then cos(pos * omega)."""
  if embed_dim % 2:
    raise ValueError(f'embed_dim must be even for a sin-cos table, got {embed_dim}.')
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid: Union[int, Tuple[int, int]],
              cls_token: bool = False) -> np.ndarray:
  """Returns the (rows*cols [+1], embed_dim) float32 table for a patch grid.

  Args:
    embed_dim: table width D; must be a multiple of 4.
    grid: patches per side, or (rows, cols).
    cls_token: prepend an all-zero row for the cls token.
  """
  if embed_dim % 4:
    raise ValueError(f'embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}.')
  rows, cols = to_2tuple(grid)
  grid_w, grid_h = np.meshgrid(np.arange(cols, dtype=np.float64),
                               np.arange(rows, dtype=np.float64))  # each (rows, cols)
  table = np.concatenate([sincos_1d(embed_dim // 2, grid_w),
                          sincos_1d(embed_dim // 2, grid_h)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
  return table.astype(np.float32)
