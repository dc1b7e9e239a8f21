"""Layer-wise learning-rate decay for ViT fine-tuning (MAE's util/lr_decay.py, after BEiT).

Layers: the patch embedding, cls token and position table are layer 0; block i is layer
i + 1; everything after the blocks (final norm / fc_norm, head) is layer depth + 1. A
parameter's lr is scaled by `decay ** (depth + 1 - layer)`. The reference multiplies the
whole scheduled lr of a parameter group (min lr included) and, with AdamW, therefore also
its weight-decay step by this scale; `scale_by_tree` after `optax.adamw` does the same.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# Encoder entries that belong to layer 0 (the embedding layer).
EMBEDDING_PARAMS = ('patch_embed', 'cls_token', 'pos_embed')


def layer_id(path: Sequence[str], depth: int) -> int:
  """Layer index of a parameter from its path in the classifier (or a bare encoder) tree."""
  path = list(path)
  if path and path[0] == 'encoder':
    path = path[1:]
  name = path[0] if path else ''
  if name in EMBEDDING_PARAMS:
    return 0
  if name.startswith('blocks_'):
    return int(name[len('blocks_'):]) + 1
  return depth + 1


def layer_lr_scales(params: Any, depth: int, decay: float) -> Any:
  """Pytree like `params` of Python floats: `decay ** (depth + 1 - layer_id)`."""
  flat = traverse_util.flatten_dict(dict(params))
  scales = {path: float(decay ** (depth + 1 - layer_id(path, depth))) for path in flat}
  return traverse_util.unflatten_dict(scales)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its own constant from a pytree matching the params."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates,
                                  scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
