"""The key names of one MAE model in three PyTorch namings, and in mae_jax's param tree.

  official    facebookresearch/mae and timm ViTs: `blocks.{i}.attn.qkv`, `decoder_blocks.{i}...`,
              and for fine-tuned classifiers `fc_norm` and `head`;
  hf          transformers >= 5 ViTMAE: `vit.layers.{i}.attention.q_proj`, `vit.layers.{i}.mlp.fc1`;
  hf_classic  transformers 4.x and the hub files: `vit.encoder.layer.{i}.attention.attention.query`.

Every conversion goes through the official naming, so each mapping is written once. Linear
`weight[out, in]` becomes `kernel = weight.T`, the patch conv goes OIHW -> HWIO, LayerNorm
`weight` becomes `scale`, and Hugging Face's q/k/v are the fused qkv rows split in three.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

StateDict = Dict[str, np.ndarray]
Params = Dict[str, Any]

LAYOUTS = ('official', 'hf', 'hf_classic')


class ConversionError(ValueError):
  """A state dict that cannot be converted; the message names the key and the fix."""


# --- Hugging Face <-> official names ----------------------------------------------------------

# Sub-keys of one transformer block: official -> (hf, hf_classic). q/k/v are handled apart.
_BLOCK_SUBKEYS = {
    'norm1': ('layernorm_before', 'layernorm_before'),
    'norm2': ('layernorm_after', 'layernorm_after'),
    'attn.proj': ('attention.o_proj', 'attention.output.dense'),
    'mlp.fc1': ('mlp.fc1', 'intermediate.dense'),
    'mlp.fc2': ('mlp.fc2', 'output.dense'),
}
_QKV_SUBKEYS = {  # hf, hf_classic
    'hf': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
    'hf_classic': ('attention.attention.query', 'attention.attention.key',
                   'attention.attention.value'),
}
# Whole-tensor renames: official -> hf (the same in both Hugging Face namings).
_HF_TOP_LEVEL = {
    'cls_token': 'vit.embeddings.cls_token',
    'pos_embed': 'vit.embeddings.position_embeddings',
    'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
    'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
    'norm.weight': 'vit.layernorm.weight',
    'norm.bias': 'vit.layernorm.bias',
    'mask_token': 'decoder.mask_token',
    'decoder_pos_embed': 'decoder.decoder_pos_embed',
}
for _m in ('decoder_embed', 'decoder_norm', 'decoder_pred'):
  for _leaf in ('weight', 'bias'):
    _HF_TOP_LEVEL[f'{_m}.{_leaf}'] = f'decoder.{_m}.{_leaf}'
_HF_BLOCK_PREFIXES = {  # official block list -> (hf, hf_classic) block list
    'blocks': ('vit.layers', 'vit.encoder.layer'),
    'decoder_blocks': ('decoder.decoder_layers', 'decoder.decoder_layers'),
}


def _hf_sub_to_official(sub: str) -> Optional[Tuple[str, Optional[int]]]:
  """A block sub-key in either Hugging Face naming -> (official sub-key, q/k/v index or None)."""
  module, _, leaf = sub.rpartition('.')
  for official, names in _BLOCK_SUBKEYS.items():
    if module in names:
      return f'{official}.{leaf}', None
  for names in _QKV_SUBKEYS.values():
    if module in names:
      return f'attn.qkv.{leaf}', names.index(module)
  return None


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> Tuple[StateDict, str]:
  """Renames a Hugging Face ViTMAE state dict (either naming) to the official one.

  Accepts `ViTMAEForPreTraining` keys (`vit.*`, `decoder.*`) and `ViTMAEModel` keys (no
  `vit.` prefix). q/k/v rows are fused into `attn.qkv`. Returns (state dict, 'hf' or
  'hf_classic'). Raises `ConversionError` listing keys it does not know.
  """
  top_level = {hf: official for official, hf in _HF_TOP_LEVEL.items()}
  out: StateDict = {}
  qkv_parts: Dict[str, List[Optional[np.ndarray]]] = {}
  unknown, naming = [], 'hf'
  for key, value in state_dict.items():
    full = key if key.startswith(('vit.', 'decoder.')) else 'vit.' + key
    if full in top_level:
      out[top_level[full]] = value
      continue
    for official_prefix, hf_prefixes in _HF_BLOCK_PREFIXES.items():
      match = next((m for m in (re.fullmatch(re.escape(p) + r'\.(\d+)\.(.+)', full)
                                for p in hf_prefixes) if m), None)
      if match:
        break
    mapped = _hf_sub_to_official(match.group(2)) if match else None
    if mapped is None:
      unknown.append(key)
      continue
    if 'encoder.layer' in full or 'attention.attention' in full or '.output.dense' in full:
      naming = 'hf_classic'
    sub, qkv_index = mapped
    official_key = f'{official_prefix}.{match.group(1)}.{sub}'
    if qkv_index is None:
      out[official_key] = value
    else:
      qkv_parts.setdefault(official_key, [None, None, None])[qkv_index] = value
  if unknown:
    raise ConversionError(f'Unknown Hugging Face ViTMAE key(s): {unknown}. Only '
                          f'ViTMAEForPreTraining / ViTMAEModel state dicts can be converted.')
  for key, parts in qkv_parts.items():
    missing = [n for n, part in zip('qkv', parts) if part is None]
    if missing:
      raise ConversionError(f'{key}: the state dict lacks the {"/".join(missing)} part(s) of the '
                            f'attention projection; it is incomplete.')
    out[key] = np.concatenate(parts, axis=0)
  return out, naming


def official_to_hf(state_dict: Mapping[str, np.ndarray], naming: str = 'hf') -> StateDict:
  """Renames an official MAE state dict to Hugging Face ViTMAE keys.

  `naming` 'hf' gives transformers >= 5 keys (`vit.layers.{i}.attention.q_proj`), which a
  `ViTMAEForPreTraining` loads with `load_state_dict(strict=True)`; 'hf_classic' gives the
  hub / transformers 4.x keys. Without decoder tensors the keys are `ViTMAEModel`'s (no `vit.`
  prefix). Fine-tuned classifiers have no Hugging Face ViTMAE counterpart.
  """
  if naming not in ('hf', 'hf_classic'):
    raise ValueError(f"naming must be 'hf' or 'hf_classic', got {naming!r}.")
  if any(k.startswith(('head.', 'fc_norm.')) for k in state_dict):
    raise ConversionError('A fine-tuned classifier (fc_norm/head) has no Hugging Face ViTMAE '
                          'counterpart: export it with format official (timm-style ViT).')
  which = 0 if naming == 'hf' else 1
  out: StateDict = {}
  for key, value in state_dict.items():
    if key in _HF_TOP_LEVEL:
      out[_HF_TOP_LEVEL[key]] = value
      continue
    match = re.fullmatch(r'(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)', key)
    if not match:
      raise ConversionError(f'{key}: not an official MAE key, cannot name it for Hugging Face.')
    prefix = f'{_HF_BLOCK_PREFIXES[match.group(1)][which]}.{match.group(2)}'
    module, leaf = match.group(3), match.group(4)
    if module == 'attn.qkv':
      for name, part in zip(_QKV_SUBKEYS[naming], np.split(value, 3, axis=0)):
        out[f'{prefix}.{name}.{leaf}'] = part
    elif module in _BLOCK_SUBKEYS:
      out[f'{prefix}.{_BLOCK_SUBKEYS[module][which]}.{leaf}'] = value
    else:
      raise ConversionError(f'{key}: not an official MAE key, cannot name it for Hugging Face.')
  if not any(k.startswith('decoder.') for k in out):
    out = {k[len('vit.'):]: v for k, v in out.items()}
  return out


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'official', 'hf' or 'hf_classic' from the key names; raises on anything else."""
  keys = list(state_dict)
  if any(k in ('cls_token', 'patch_embed.proj.weight') or k.startswith('blocks.') for k in keys):
    return 'official'
  hf_roots = ('vit.', 'decoder.decoder_', 'embeddings.', 'layers.', 'encoder.layer.')
  if any(k.startswith(hf_roots) for k in keys):
    if any('encoder.layer.' in k or 'attention.attention.' in k for k in keys):
      return 'hf_classic'
    return 'hf'
  raise ConversionError(
      f'Unknown checkpoint layout (first keys: {keys[:5]}). Expected the official MAE naming '
      f'(cls_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...) or Hugging Face '
      f'ViTMAE naming (vit.embeddings.cls_token, vit.layers.0.attention.q_proj.weight, ...).')


def to_official(state_dict: Mapping[str, np.ndarray]) -> Tuple[StateDict, str]:
  """Any supported naming -> (official state dict, detected layout)."""
  if state_dict and all(k.startswith('module.') for k in state_dict):  # saved from a DDP wrapper
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  layout = detect_layout(state_dict)
  if layout == 'official':
    return dict(state_dict), layout
  official, naming = hf_to_official(state_dict)
  return official, naming


# --- official names <-> mae_jax param paths ---------------------------------------------------

# Official module -> mae_jax module path. `{i}` is a block index, `{sub}` a block sub-module.
_MODULES = (
    (r'patch_embed\.proj', ('encoder', 'patch_embed')),
    (r'blocks\.(?P<i>\d+)\.(?P<sub>norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)',
     ('encoder', 'blocks_{i}', '{sub}')),
    (r'norm', ('encoder', 'norm')),
    (r'decoder_embed', ('decoder', 'embed')),
    (r'decoder_blocks\.(?P<i>\d+)\.(?P<sub>norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)',
     ('decoder', 'blocks_{i}', '{sub}')),
    (r'decoder_norm', ('decoder', 'norm')),
    (r'decoder_pred', ('decoder', 'pred')),
    (r'fc_norm', ('fc_norm',)),
    (r'head', ('head',)),
)
TOKENS = {'cls_token': ('encoder', 'cls_token'), 'mask_token': ('decoder', 'mask_token'),
           'pos_embed': ('encoder', 'pos_embed')}
POS_TABLES = ('pos_embed', 'decoder_pos_embed')


def _param_path(key: str) -> Optional[Tuple[str, ...]]:
  """Official key -> mae_jax param path (None for keys mae_jax does not hold as params)."""
  if key in TOKENS:
    return TOKENS[key]
  module, _, leaf = key.rpartition('.')
  if leaf not in ('weight', 'bias'):
    return None
  for pattern, template in _MODULES:
    match = re.fullmatch(pattern, module)
    if match:
      groups = match.groupdict()
      path = []
      for part in template:
        path.extend(part.format(**groups).split('.') if '{sub}' in part
                    else [part.format(**groups)])
      # weight's param name depends on the layer: LayerNorm scale or Dense/conv kernel.
      return tuple(path) + (leaf,)
  return None


def official_key(path: Tuple[str, ...]) -> Optional[str]:
  """mae_jax param path -> official module key without the leaf (inverse of `_param_path`)."""
  for key, token_path in TOKENS.items():
    if path == token_path:
      return key
  joined = '.'.join(path[:-1])
  candidates = {
      'encoder.patch_embed': 'patch_embed.proj', 'encoder.norm': 'norm',
      'decoder.embed': 'decoder_embed', 'decoder.norm': 'decoder_norm',
      'decoder.pred': 'decoder_pred', 'fc_norm': 'fc_norm', 'head': 'head'}
  if joined in candidates:
    return candidates[joined]
  match = re.fullmatch(r'(encoder|decoder)\.blocks_(\d+)\.(.+)', joined)
  if match:
    prefix = 'blocks' if match.group(1) == 'encoder' else 'decoder_blocks'
    return f'{prefix}.{match.group(2)}.{match.group(3)}'
  return None


def _to_param_leaf(leaf: str, value: np.ndarray) -> Tuple[str, np.ndarray]:
  if leaf == 'bias':
    return 'bias', value
  if value.ndim == 1:
    return 'scale', value  # LayerNorm weight
  if value.ndim == 2:
    return 'kernel', value.T  # Linear weight[out, in]
  if value.ndim == 4:
    return 'kernel', value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
  raise ConversionError(f'weight of rank {value.ndim} is neither a LayerNorm, Linear or conv.')


def _from_param_leaf(leaf: str, value: np.ndarray) -> Tuple[str, np.ndarray]:
  if leaf == 'bias':
    return 'bias', value
  if leaf == 'scale':
    return 'weight', value
  if leaf == 'kernel' and value.ndim == 2:
    return 'weight', value.T
  if leaf == 'kernel' and value.ndim == 4:
    return 'weight', value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  raise ConversionError(f'param {leaf!r} of rank {value.ndim} has no PyTorch counterpart.')


def flatten(tree: Mapping[str, Any]) -> Dict[Tuple[str, ...], Any]:
  """{path tuple: leaf} of a nested dict (FrozenDicts and orbax's dicts alike)."""
  return traverse_util.flatten_dict(_as_dict(tree))


def _as_dict(tree: Any) -> Any:
  return {k: _as_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def official_to_params(state_dict: Mapping[str, np.ndarray]) -> Params:
  """Official state dict -> mae_jax param tree. Position tables are not params (see
  `from_state_dict`, which checks them); `pos_embed` becomes `encoder/pos_embed` only when
  present here. Raises `ConversionError` listing unknown keys."""
  flat, unknown = {}, []
  for key, value in state_dict.items():
    if key == 'decoder_pos_embed':
      continue
    path = _param_path(key)
    if path is None:
      unknown.append(key)
      continue
    value = np.asarray(value, dtype=np.float32)
    if key not in TOKENS:
      leaf, value = _to_param_leaf(path[-1], value)
      path = path[:-1] + (leaf,)
    flat[path] = value
  if unknown:
    raise ConversionError(f'Unknown key(s) in the official-layout state dict: {unknown}. Known: '
                          f'MAE pretraining (encoder, decoder_*) and fine-tuned ViT (fc_norm, '
                          f'head) tensors.')
  return traverse_util.unflatten_dict(flat)


def params_to_official(params: Mapping[str, Any]) -> StateDict:
  """mae_jax param tree -> official state dict (numpy), position tables not included."""
  out: StateDict = {}
  for path, value in flatten(params).items():
    value = np.asarray(value, dtype=np.float32)
    key = official_key(path)
    if key is None:
      raise ConversionError(f'param {"/".join(path)} has no counterpart in the official MAE '
                            f'layout (e.g. the mask_token_in_encoder baseline).')
    if key in TOKENS:
      out[key] = value
    else:
      leaf, value = _from_param_leaf(path[-1], value)
      out[f'{key}.{leaf}'] = np.ascontiguousarray(value)
  return out

