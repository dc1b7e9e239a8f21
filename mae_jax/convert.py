"""PyTorch MAE checkpoints <-> mae_jax params: the official release and Hugging Face ViTMAE.

Three namings of the same tensors are understood (MAE.md section 7):

  official    facebookresearch/mae and timm ViTs: `blocks.{i}.attn.qkv`, `decoder_blocks.{i}...`,
              and for fine-tuned classifiers `fc_norm` and `head`;
  hf          transformers >= 5 ViTMAE: `vit.layers.{i}.attention.q_proj`, `vit.layers.{i}.mlp.fc1`;
  hf_classic  transformers 4.x and the hub files: `vit.encoder.layer.{i}.attention.attention.query`.

Every import goes through the official naming (detect -> rename to official -> params) and every
export starts from it, so each mapping is written once. Linear `weight[out, in]` becomes
`kernel = weight.T`, the patch conv goes OIHW -> HWIO, and Hugging Face's separate q/k/v rows are
the fused qkv weight split in three. Stored position tables are checked against mae_jax's own
sin-cos tables (a table of another resolution means `img_size` is wrong).

torch is imported only by the functions that read or write `.pth` files; files are read with
`torch.load(weights_only=True)` (or safetensors), so a downloaded checkpoint never runs code.

Command line:
  python -m mae_jax.convert --input mae_pretrain_vit_base.pth --output /ckpt/vit_b
  python -m mae_jax.convert --input /ckpt/vit_b --output vit_b.pth --format official|hf
"""
import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from mae_jax import presets
from mae_jax.patches import Size2D, grid_size, to_2tuple
from mae_jax.pos_embed import sincos_2d

StateDict = Dict[str, np.ndarray]
Params = Dict[str, Any]

KINDS = ('pretrain', 'full', 'classifier')
LAYOUTS = ('official', 'hf', 'hf_classic')
# Stored float32 sin-cos tables equal a fresh float32 table to a few ulp; a table of another
# layout or resolution differs by O(1).
POS_TABLE_TOLERANCE = 1e-5


class ConversionError(ValueError):
  """A state dict that cannot be converted; the message names the key and the fix."""


@dataclasses.dataclass
class Converted:
  """The result of `from_state_dict`.

  params: the mae_jax param tree (numpy float32 leaves).
  model_config: the model fields (`MaskedAutoencoder(**model_config)` for 'pretrain' / 'full').
  kind: 'pretrain' (encoder only), 'full' (encoder + decoder) or 'classifier'.
  layout: the naming the state dict used: 'official', 'hf' or 'hf_classic'.
  pos_embed_max_diff: per stored table, max |stored - mae_jax sin-cos table|.
  """
  params: Params
  model_config: Dict[str, Any]
  kind: str
  layout: str
  pos_embed_max_diff: Dict[str, float]


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
_TOKENS = {'cls_token': ('encoder', 'cls_token'), 'mask_token': ('decoder', 'mask_token'),
           'pos_embed': ('encoder', 'pos_embed')}
_POS_TABLES = ('pos_embed', 'decoder_pos_embed')


def _param_path(key: str) -> Optional[Tuple[str, ...]]:
  """Official key -> mae_jax param path (None for keys mae_jax does not hold as params)."""
  if key in _TOKENS:
    return _TOKENS[key]
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


def _official_key(path: Tuple[str, ...]) -> Optional[str]:
  """mae_jax param path -> official module key without the leaf (inverse of `_param_path`)."""
  for key, token_path in _TOKENS.items():
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


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (name,)))
    else:
      flat[prefix + (name,)] = value
  return flat


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


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
    if key not in _TOKENS:
      leaf, value = _to_param_leaf(path[-1], value)
      path = path[:-1] + (leaf,)
    flat[path] = value
  if unknown:
    raise ConversionError(f'Unknown key(s) in the official-layout state dict: {unknown}. Known: '
                          f'MAE pretraining (encoder, decoder_*) and fine-tuned ViT (fc_norm, '
                          f'head) tensors.')
  return _unflatten(flat)


def params_to_official(params: Mapping[str, Any]) -> StateDict:
  """mae_jax param tree -> official state dict (numpy), position tables not included."""
  out: StateDict = {}
  for path, value in _flatten(params).items():
    value = np.asarray(value, dtype=np.float32)
    key = _official_key(path)
    if key is None:
      raise ConversionError(f'param {"/".join(path)} has no counterpart in the official MAE '
                            f'layout (e.g. the mask_token_in_encoder baseline).')
    if key in _TOKENS:
      out[key] = value
    else:
      leaf, value = _from_param_leaf(path[-1], value)
      out[f'{key}.{leaf}'] = np.ascontiguousarray(value)
  return out


# --- model config from shapes, and shape validation -------------------------------------------

def _block_count(state_dict: Mapping[str, Any], prefix: str) -> int:
  indices = {int(m.group(1)) for k in state_dict
             for m in [re.match(re.escape(prefix) + r'\.(\d+)\.', k)] if m}
  return max(indices) + 1 if indices else 0


def _require(state_dict: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in state_dict:
    raise ConversionError(f'The state dict has no {key!r}: it is not a complete MAE / ViT '
                          f'checkpoint (first keys: {list(state_dict)[:5]}).')
  return state_dict[key]


def _heads_from_presets(fields: Dict[str, int], heads_field: str) -> Optional[int]:
  """The head count of the presets whose other fields all equal `fields` (None if ambiguous)."""
  found = {m[heads_field] for m in presets.MODELS.values()
           if all(m.get(k) == v for k, v in fields.items())}
  return found.pop() if len(found) == 1 else None


def checkpoint_kind(state_dict: Mapping[str, Any]) -> str:
  """'classifier' (has head), 'full' (has decoder) or 'pretrain' (encoder only), official keys."""
  if 'head.weight' in state_dict:
    return 'classifier'
  if any(k.startswith(('decoder_', 'mask_token')) for k in state_dict):
    return 'full'
  return 'pretrain'


def infer_model_config(state_dict: Mapping[str, np.ndarray], *,
                       num_heads: Optional[int] = None,
                       decoder_num_heads: Optional[int] = None,
                       img_size: Optional[Size2D] = None,
                       layer_norm_eps: float = 1e-6,
                       norm_pix_loss: bool = False) -> Dict[str, Any]:
  """The model fields of an official-layout state dict, from its tensor shapes.

  Widths, depths, patch size, channels and MLP ratio come from shapes; the image size from
  the position table (square grids; pass `img_size` otherwise). Head counts are not stored in
  a checkpoint: they come from the preset with the same width, depth and patch size (ViT-B/L/H
  and the paper's decoder), else from `num_heads` / `decoder_num_heads`. Neither LayerNorm eps
  nor the loss target is stored either: the release uses eps 1e-6, and its `mae_pretrain_*`
  weights were trained with norm_pix_loss (the `visualize` ones without).
  """
  conv = np.shape(_require(state_dict, 'patch_embed.proj.weight'))
  if len(conv) != 4 or conv[2] != conv[3]:
    raise ConversionError(f'patch_embed.proj.weight has shape {conv}; expected a square conv '
                          f'kernel (embed_dim, channels, p, p).')
  embed_dim, in_chans, patch_size = conv[0], conv[1], conv[2]
  depth = _block_count(state_dict, 'blocks')
  hidden = np.shape(_require(state_dict, 'blocks.0.mlp.fc1.weight'))[0]
  cfg = presets.model_config('vit_b').to_dict()
  cfg.update(in_chans=int(in_chans), patch_size=int(patch_size), embed_dim=int(embed_dim),
             depth=depth, mlp_ratio=hidden / embed_dim, layer_norm_eps=layer_norm_eps,
             norm_pix_loss=norm_pix_loss)
  if img_size is None:
    table = next((state_dict[k] for k in _POS_TABLES if k in state_dict), None)
    if table is None:
      raise ConversionError('The state dict holds no position table to read the image size '
                            'from: pass img_size (--img-size).')
    num_patches = np.shape(table)[-2] - 1
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
      raise ConversionError(f'The position table has {num_patches} patch rows, not a square '
                            f'grid: pass img_size (--img-size) as (height, width).')
    img_size = side * patch_size
  cfg['img_size'] = img_size if isinstance(img_size, int) else tuple(to_2tuple(img_size))
  cfg['num_heads'] = num_heads or _heads_from_presets(
      dict(embed_dim=embed_dim, depth=depth, patch_size=patch_size), 'num_heads')
  if not cfg['num_heads']:
    raise ConversionError(f'Head count unknown for an encoder of width {embed_dim}, depth {depth}, '
                          f'patch {patch_size} (not a preset): pass num_heads (--num-heads).')
  if 'decoder_embed.weight' in state_dict:
    dec_width = int(np.shape(state_dict['decoder_embed.weight'])[0])
    dec_depth = _block_count(state_dict, 'decoder_blocks')
    cfg.update(decoder_embed_dim=dec_width, decoder_depth=dec_depth)
    if dec_depth:
      dec_hidden = np.shape(_require(state_dict, 'decoder_blocks.0.mlp.fc1.weight'))[0]
      if dec_hidden != hidden / embed_dim * dec_width:
        raise ConversionError(
            f'decoder_blocks.0.mlp.fc1.weight has {dec_hidden} hidden units; mae_jax uses one '
            f'mlp_ratio ({hidden / embed_dim}) for encoder and decoder, which needs '
            f'{hidden / embed_dim * dec_width:g}.')
    cfg['decoder_num_heads'] = decoder_num_heads or _heads_from_presets(
        dict(decoder_embed_dim=dec_width, decoder_depth=dec_depth), 'decoder_num_heads')
    if not cfg['decoder_num_heads']:
      raise ConversionError(f'Decoder head count unknown for width {dec_width}, depth '
                            f'{dec_depth} (not a preset): pass decoder_num_heads '
                            f'(--decoder-num-heads).')
  elif decoder_num_heads:
    cfg['decoder_num_heads'] = decoder_num_heads
  if 'head.weight' in state_dict:
    # The same record the downstream jobs store next to a classifier's params.
    cfg['classifier'] = {'job': 'finetune',
                         'num_classes': int(np.shape(state_dict['head.weight'])[0]),
                         'global_pool': 'fc_norm.weight' in state_dict,
                         'trainable_blocks': None}
  return cfg


def _shape_to_official(leaf: str, shape: Tuple[int, ...]) -> Tuple[str, Tuple[int, ...]]:
  if leaf == 'kernel' and len(shape) == 2:
    return 'weight', shape[::-1]
  if leaf == 'kernel' and len(shape) == 4:
    return 'weight', tuple(shape[i] for i in (3, 2, 0, 1))
  return {'scale': 'weight'}.get(leaf, leaf), tuple(shape)


def expected_shapes(model_config: Mapping[str, Any], kind: str) -> Dict[str, Tuple[int, ...]]:
  """Official key -> shape that the mae_jax model of `model_config` holds, via `jax.eval_shape`
  (nothing is allocated, so ViT-H costs nothing). Position tables included."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cfg = dict(model_config)
  h, w = to_2tuple(cfg['img_size'])
  images = jnp.zeros((1, h, w, cfg.get('in_chans', 3)), jnp.float32)
  rng = jax.random.key(0)
  if kind == 'full':
    from mae_jax.mae import MaskedAutoencoder  # pylint: disable=g-import-not-at-top
    model = MaskedAutoencoder(**{k: v for k, v in cfg.items()
                                 if k in MaskedAutoencoder.__dataclass_fields__})
    shapes = jax.eval_shape(lambda: model.init({'params': rng, 'mask': rng}, images))['params']
  elif kind == 'pretrain':
    from mae_jax.vit import Encoder  # pylint: disable=g-import-not-at-top
    encoder = Encoder(img_size=cfg['img_size'], patch_size=cfg['patch_size'],
                      embed_dim=cfg['embed_dim'], depth=cfg['depth'], num_heads=cfg['num_heads'],
                      mlp_ratio=cfg['mlp_ratio'], layer_norm_eps=cfg['layer_norm_eps'])
    shapes = {'encoder': jax.eval_shape(lambda: encoder.init(rng, images))['params']}
  else:
    shapes = _classifier_shapes(cfg, images)
  out = {}
  for path, leaf_shape in _flatten(shapes).items():
    key = _official_key(path)
    if key in _TOKENS:
      out[key] = tuple(leaf_shape.shape)
    elif key is not None:
      leaf, shape = _shape_to_official(path[-1], tuple(leaf_shape.shape))
      out[f'{key}.{leaf}'] = shape
  num_patches = int(np.prod(grid_size(cfg['img_size'], cfg['patch_size'])))
  out['pos_embed'] = (1, num_patches + 1, cfg['embed_dim'])
  if kind == 'full':
    out['decoder_pos_embed'] = (1, num_patches + 1, cfg['decoder_embed_dim'])
  return out


def check_shapes(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any],
                 kind: str) -> None:
  """Raises `ConversionError` naming the first key whose shape differs from the model's
  (both shapes), then missing and unknown keys. Position tables may be absent."""
  expected = expected_shapes(model_config, kind)
  described = ', '.join(f'{k}={model_config[k]}' for k in (
      'img_size', 'patch_size', 'embed_dim', 'depth', 'decoder_embed_dim', 'decoder_depth')
                        if k in model_config)
  for key, value in state_dict.items():
    if key in expected and tuple(np.shape(value)) != expected[key]:
      raise ConversionError(
          f'{key}: the checkpoint holds shape {tuple(np.shape(value))}, the model ({described}) '
          f'expects {expected[key]}. Use the config (or --img-size / model size) the checkpoint '
          f'was trained with.')
  unknown = [k for k in state_dict if k not in expected]
  if unknown:
    raise ConversionError(f'Unknown key(s) for a {kind} MAE checkpoint: {unknown}.')
  missing = [k for k in expected if k not in state_dict and k not in _POS_TABLES]
  if missing:
    raise ConversionError(f'The {kind} checkpoint lacks key(s) {missing}: it is incomplete.')


def _classifier_shapes(cfg: Dict[str, Any], images: Any) -> Params:
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  head = cfg['classifier']
  model = classifier_lib.classifier_from_config(cfg, head['num_classes'],
                                                global_pool=head['global_pool'])
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))['params']


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch is not imported here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def check_pos_table(name: str, table: np.ndarray, grid: Tuple[int, int]) -> float:
  """Max |table - mae_jax's sin-cos table (cls row zero)|; raises on a shape mismatch."""
  width = np.shape(table)[-1]
  expected = sincos_2d(width, grid, cls_token=True)[None]
  if tuple(np.shape(table)) != expected.shape:
    raise ConversionError(
        f'{name} has shape {tuple(np.shape(table))}, a {grid[0]}x{grid[1]} patch grid needs '
        f'{expected.shape}: the config img_size does not match the checkpoint\'s resolution.')
  return float(np.max(np.abs(np.asarray(table, np.float64) - expected)))


def from_state_dict(state_dict: Mapping[str, Any], *,
                    model_config: Optional[Mapping[str, Any]] = None,
                    num_heads: Optional[int] = None,
                    decoder_num_heads: Optional[int] = None,
                    img_size: Optional[Size2D] = None,
                    layer_norm_eps: float = 1e-6,
                    norm_pix_loss: bool = False,
                    pos_embed: str = 'check') -> Converted:
  """Converts a PyTorch MAE / ViTMAE state dict (any supported naming) into mae_jax params.

  Args:
    state_dict: name -> tensor (torch tensors or numpy arrays), the `'model'` entry of an
      official file or a Hugging Face state dict.
    model_config: the model fields to convert into (e.g. `config.model`); inferred from the
      shapes when None (see `infer_model_config`, which takes the remaining arguments).
    pos_embed: what to do with the stored encoder position table. 'check' (default): raise
      if it differs from mae_jax's sin-cos table; 'warn': warn and use mae_jax's table; 'keep':
      keep it as the learnable `encoder/pos_embed` param (`Encoder(learn_pos_embed=True)`).
      Classifiers always keep theirs (fine-tuning trains it).

  Returns:
    A `Converted` with params, model config, kind, layout and the tables' max differences.
  """
  if pos_embed not in ('check', 'warn', 'keep'):
    raise ValueError(f"pos_embed must be 'check', 'warn' or 'keep', got {pos_embed!r}.")
  official, layout = to_official({k: _as_numpy(v) for k, v in state_dict.items()})
  kind = checkpoint_kind(official)
  if model_config is None:
    cfg = infer_model_config(official, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                             img_size=img_size, layer_norm_eps=layer_norm_eps,
                             norm_pix_loss=norm_pix_loss)
  else:
    cfg = dict(model_config)
  check_shapes(official, cfg, kind)
  grid = grid_size(cfg['img_size'], cfg['patch_size'])
  diffs = {name: check_pos_table(name, official[name], grid)
           for name in _POS_TABLES if name in official}
  keep = kind == 'classifier' or pos_embed == 'keep'
  for name, diff in diffs.items():
    if diff <= POS_TABLE_TOLERANCE or (keep and name == 'pos_embed'):
      continue
    zeros = not np.any(official[name][:, 1:])
    message = (f'{name} differs from the fixed 2-D sin-cos table of a {grid[0]}x{grid[1]} grid by '
               f'{diff:.3g} (max abs): ' +
               ('it is all zeros (a transformers 5.x model built without from_pretrained holds '
                'zero tables; fill them first).' if zeros else
                'the checkpoint was not trained with the fixed sin-cos table mae_jax uses.') +
               (" Pass pos_embed='keep' (--pos-embed keep) to keep it as a learnable table."
                if name == 'pos_embed' else ''))
    if pos_embed == 'check':
      raise ConversionError(message)
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn(message + ' Using mae_jax\'s own table instead.')
  tensors = {k: v for k, v in official.items()
             if k not in _POS_TABLES or (k == 'pos_embed' and keep)}
  if keep and 'pos_embed' not in tensors:
    tensors['pos_embed'] = sincos_2d(cfg['embed_dim'], grid, cls_token=True)[None]
  return Converted(params=official_to_params(tensors), model_config=cfg, kind=kind,
                   layout=layout, pos_embed_max_diff=diffs)


def to_state_dict(params: Mapping[str, Any], model_config: Mapping[str, Any],
                  format: str = 'official') -> StateDict:  # pylint: disable=redefined-builtin
  """mae_jax params -> numpy state dict in the official ('official') or Hugging Face ('hf',
  'hf_classic') naming, with the position tables the PyTorch models hold as tensors
  (a learned `encoder/pos_embed` if present, else the fixed sin-cos tables)."""
  if format not in LAYOUTS:
    raise ValueError(f'format must be one of {LAYOUTS}, got {format!r}.')
  official = params_to_official(params)
  if not model_config or model_config.get('img_size') is None:
    raise ConversionError('The image size is needed to write the position tables: pass a model '
                          'config with img_size (--img-size).')
  patch_size = official['patch_embed.proj.weight'].shape[-1]
  grid = grid_size(model_config['img_size'], patch_size)
  tables = {'pos_embed': official.pop('pos_embed', None)}
  if tables['pos_embed'] is None:
    tables['pos_embed'] = sincos_2d(official['cls_token'].shape[-1], grid, cls_token=True)[None]
  if 'decoder_embed.weight' in official:
    tables['decoder_pos_embed'] = sincos_2d(official['decoder_embed.weight'].shape[0], grid,
                                            cls_token=True)[None]
  official = {**tables, **official}
  if format == 'official':
    return official
  return official_to_hf(official, naming=format)


# --- files ------------------------------------------------------------------------------------

def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
  """The state dict inside a loaded checkpoint object ({'model': sd}, {'state_dict': sd}, sd)."""
  if isinstance(obj, Mapping):
    for entry in ('model', 'state_dict', 'model_state'):
      if isinstance(obj.get(entry), Mapping):
        return obj[entry]
    if obj and all(hasattr(v, 'shape') for v in obj.values()):
      return obj
  keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
  raise ConversionError(f'{path} holds no state dict (found {keys}); expected '
                        f"{{'model': state_dict}} as in the MAE release, or a state dict.")


def read_state_dict(path: str) -> StateDict:
  """Reads a `.pth` / `.bin` (torch) or `.safetensors` file; returns its state dict as numpy.

  torch files are read with `torch.load(weights_only=True)`: a pickle that would construct
  anything but tensors and plain containers (i.e. run code) is refused, not executed. The
  release's training checkpoints also hold an `argparse.Namespace`, which is allowed.
  """
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise ConversionError(f'{path} does not exist: pass the path of a .pth or .safetensors file.')
  if os.path.isdir(path):
    raise ConversionError(f'{path} is a directory, not a PyTorch checkpoint file.')
  with open(path, 'rb') as f:
    head = f.read(16)
  if path.endswith('.safetensors') or head[8:9] == b'{':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    except Exception as e:  # safetensors raises its own SafetensorError
      raise ConversionError(f'{path} is not a readable safetensors file ({e}).') from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError('Reading .pth files needs torch: pip install "mae_jax[torch]" (CPU '
                          'build is enough).') from None
  import argparse  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # The safe unpickler stops at the first thing that is not a tensor or plain container:
    # an import of a callable ('Unsupported global') or other object building is refused;
    # an unknown opcode ('Unsupported operand') means the bytes are not a pickle at all.
    detail = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    if 'Weights only load failed' in str(e) and 'Unsupported operand' not in str(e):
      what = f' ({detail.group(1)})' if detail else ''
      raise ConversionError(
          f'{path} was refused: it holds a Python object{what} whose loading would run code, and '
          f'only tensors are read (torch.load weights_only=True). Use a file from the official '
          f'release or re-save just the state dict from a source you trust.') from None
    raise ConversionError(f'{path} is not a PyTorch checkpoint (unpickling failed: '
                          f'{str(e).splitlines()[0]}).') from None
  except Exception as e:  # torch raises many types for files that are not checkpoints
    first = (str(e).splitlines() or [''])[0]
    raise ConversionError(f'{path} is not a PyTorch checkpoint ({type(e).__name__}: '
                          f'{first}).') from None
  state = _state_dict_of(obj, path)
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise ConversionError(f'{path}: state dict entries {bad[:5]} are not tensors.')
  return {k: _as_numpy(v) for k, v in state.items()}


def write_state_dict(path: str, state_dict: Mapping[str, np.ndarray], format: str = 'official'
                     ) -> None:  # pylint: disable=redefined-builtin
  """Writes a numpy state dict for PyTorch, never over an existing file.

  'official' -> `torch.save({'model': state_dict})`, loadable by the MAE release and
  timm-style ViTs; 'hf' / 'hf_classic' -> a plain state dict (`pytorch_model.bin` style), or a
  safetensors file when `path` ends in `.safetensors`.
  """
  import os  # pylint: disable=g-import-not-at-top
  if os.path.exists(path):
    raise ConversionError(f'{path} already exists; nothing was written. Choose a new output '
                          f'path or delete the old file first.')
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in
             state_dict.items()}
  tmp = f'{path}.tmp-{os.getpid()}'
  if path.endswith('.safetensors'):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, tmp)
  else:
    torch.save({'model': tensors} if format == 'official' else tensors, tmp)
  os.replace(tmp, path)


def load_pytorch_checkpoint(path: str, **kwargs) -> Converted:
  """Reads a PyTorch MAE / ViTMAE checkpoint file and converts it (see `from_state_dict`)."""
  return from_state_dict(read_state_dict(path), **kwargs)


def export_pytorch_checkpoint(path: str, params: Mapping[str, Any],
                              model_config: Mapping[str, Any],
                              format: str = 'official') -> StateDict:  # pylint: disable=redefined-builtin
  """Writes mae_jax params as a PyTorch file (see `to_state_dict`, `write_state_dict`)."""
  record = (model_config or {}).get('classifier') or {}
  if record.get('job') == 'linear_probe':
    raise ConversionError('A linear-probe classifier is not complete without its BatchNorm '
                          'statistics, which params-only files do not hold; export the encoder '
                          'of its pretraining checkpoint instead.')
  state = to_state_dict(params, model_config, format)
  write_state_dict(path, state, format)
  return state


# --- command line -----------------------------------------------------------------------------

def _parse_args(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m mae_jax.convert',
      description='Convert PyTorch MAE checkpoints (official release or Hugging Face ViTMAE) to a '
                  'mae_jax orbax checkpoint directory, or a mae_jax checkpoint back to PyTorch.')
  parser.add_argument('--input', required=True,
                      help='a .pth/.bin/.safetensors file (import) or a mae_jax checkpoint '
                           'directory / workdir (export)')
  parser.add_argument('--output', required=True,
                      help='the new checkpoint directory (import) or .pth file (export)')
  parser.add_argument('--format', choices=LAYOUTS, default='official',
                      help='export naming: official (MAE release / timm ViT), hf (transformers '
                           '>= 5 ViTMAE), hf_classic (hub / transformers 4.x names)')
  parser.add_argument('--num-heads', type=int, help='encoder heads (default: from a preset)')
  parser.add_argument('--decoder-num-heads', type=int, help='decoder heads (default: preset)')
  parser.add_argument('--img-size', type=int, nargs='+',
                      help='image size (H [W]); default: from the position table')
  parser.add_argument('--layer-norm-eps', type=float, default=1e-6,
                      help='LayerNorm eps of the model (the release uses 1e-6; HF hub configs '
                           'say 1e-12)')
  parser.add_argument('--norm-pix-loss', action='store_true',
                      help='record norm_pix_loss=True in the model config (the mae_pretrain_* '
                           'release was trained with it)')
  parser.add_argument('--pos-embed', choices=('check', 'warn', 'keep'), default='check',
                      help='a stored encoder position table that is not the sin-cos table: '
                           'check = error, warn = use mae_jax\'s table, keep = keep it as a param')
  return parser.parse_args(argv)


def _img_size(values):
  if not values:
    return None
  return values[0] if len(values) == 1 else tuple(values[:2])


def main(argv=None) -> int:
  """The command line; returns the exit status (2 with a one-line message on bad input)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  args = _parse_args(argv)
  try:
    if os.path.exists(args.output):
      raise ConversionError(f'{args.output} already exists; nothing was written. Choose a new '
                            f'output path or delete the old one first.')
    if os.path.isdir(args.input):
      params, model_config = checkpoint.load_params(args.input)
      model_config = dict(model_config or {})
      if args.img_size:
        model_config['img_size'] = _img_size(args.img_size)
      state = export_pytorch_checkpoint(args.output, params, model_config, args.format)
      print(f'Wrote {len(state)} tensors in the {args.format} naming to {args.output}.')
      return 0
    converted = load_pytorch_checkpoint(
        args.input, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
        img_size=_img_size(args.img_size), layer_norm_eps=args.layer_norm_eps,
        norm_pix_loss=args.norm_pix_loss, pos_embed=args.pos_embed)
    checkpoint.save_params(args.output, converted.params, converted.model_config)
  except (ConversionError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = sum(int(np.prod(np.shape(v))) for v in _flatten(converted.params).values())
  diffs = ', '.join(f'{k} {v:.2g}' for k, v in converted.pos_embed_max_diff.items()) or 'none'
  cfg = converted.model_config
  print(f'Converted a {converted.kind} checkpoint ({converted.layout} naming, {count:,} params): '
        f'img_size {cfg["img_size"]}, patch {cfg["patch_size"]}, width {cfg["embed_dim"]}, depth '
        f'{cfg["depth"]}, heads {cfg["num_heads"]}; position tables vs sin-cos (max abs diff): '
        f'{diffs}. Wrote {args.output}.')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
