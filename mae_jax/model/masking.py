"""Per-example random-shuffle masking: shuffle the patches, keep the first few, remember the order.

Every example draws its own permutation from a key folded from the batch key and the
example's *global* index, so a given example gets the same mask whatever batch, device
or host it lands on. Passing `noise` instead reproduces the reference exactly: it
argsorts the noise ascending and keeps the first `len_keep` patches.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  """Result of `random_masking`.

  ids_keep: (B, len_keep) patch indices kept, in shuffled order.
  ids_restore: (B, L) inverse permutation, to put shuffled tokens back in patch order.
  mask: (B, L) float, 1 = removed, 0 = kept, in patch order.
  """
  ids_keep: jnp.ndarray
  ids_restore: jnp.ndarray
  mask: jnp.ndarray


def check_mask_ratio(mask_ratio: float) -> float:
  """Raises unless `mask_ratio` is a Python number in [0, 1)."""
  try:
    ratio = float(mask_ratio)
  except TypeError as e:
    raise TypeError(
        f'mask_ratio must be a Python float (it fixes the number of kept tokens, a static '
        f'shape), got {type(mask_ratio).__name__}.') from e
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}: use e.g. 0.75.')
  return ratio


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """`len_keep = int(L * (1 - mask_ratio))`, as in the reference."""
  return int(num_patches * (1 - check_mask_ratio(mask_ratio)))


def example_keys(rng: jax.Array, example_ids: jnp.ndarray) -> jax.Array:
  """One key per example: `fold_in(rng, global_index)`."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_ids)


def random_masking(batch_size: int, num_patches: int, mask_ratio: float,
                   rng: Optional[jax.Array] = None,
                   example_ids: Optional[jnp.ndarray] = None,
                   noise: Optional[jnp.ndarray] = None) -> Masking:
  """Draws the shuffle for a batch.

  Args:
    batch_size: B.
    num_patches: L.
    mask_ratio: fraction of patches removed, in [0, 1).
    rng: batch key; example i uses `fold_in(rng, example_ids[i])`.
    example_ids: (B,) global example indices; defaults to `arange(B)`.
    noise: optional (B, L) array; if given, `rng` is ignored and the shuffle is
      `argsort(noise)` (ascending), exactly as in the PyTorch release.

  Returns:
    A `Masking` with `ids_keep`, `ids_restore` and `mask`.
  """
  len_keep = num_kept(num_patches, mask_ratio)
  if noise is not None:
    if noise.shape != (batch_size, num_patches):
      raise ValueError(f'noise must have shape (batch, num_patches) = '
                       f'{(batch_size, num_patches)}, got {noise.shape}.')
    ids_shuffle = jnp.argsort(noise, axis=1)
  else:
    if rng is None:
      raise ValueError("random masking needs a key: pass rngs={'mask': key} or a `noise` array.")
    if example_ids is None:
      example_ids = jnp.arange(batch_size)
    keys = example_keys(rng, example_ids)
    ids_shuffle = jax.vmap(lambda k: jax.random.permutation(k, num_patches))(keys)
  ids_shuffle = ids_shuffle.astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :len_keep]
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
  """x: (B, L, D), ids: (B, K) -> (B, K, D), tokens `x[b, ids[b, k]]`."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)
