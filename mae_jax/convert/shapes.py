"""A checkpoint's model config from its tensor shapes, and the checks a conversion makes.

Widths, depths, patch size and MLP ratio are read from shapes; the image size from the
position table; head counts (never stored) from a matching preset or an argument. Every
tensor is then checked against the shapes of the mae_jax model that config builds
(`jax.eval_shape`, so ViT-H costs nothing), and stored position tables against mae_jax's
own sin-cos tables.
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from mae_jax.convert.names import POS_TABLES, TOKENS, ConversionError, Params, flatten, official_key
from mae_jax.model import presets
from mae_jax.model.patches import Size2D, grid_size, to_2tuple
from mae_jax.model.pos_embed import sincos_2d

KINDS = ('pretrain', 'full', 'classifier')
# Stored float32 sin-cos tables equal a fresh float32 table to a few ulp; a table of another
# layout or resolution differs by O(1).
POS_TABLE_TOLERANCE = 1e-5


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


def classifier_record(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The classifier fields of a fine-tuned checkpoint, as the downstream jobs record them."""
  return {'job': 'finetune', 'num_classes': int(np.shape(state_dict['head.weight'])[0]),
          'global_pool': 'fc_norm.weight' in state_dict, 'trainable_blocks': None}


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
    table = next((state_dict[k] for k in POS_TABLES if k in state_dict), None)
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
    cfg['classifier'] = classifier_record(state_dict)
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
    from mae_jax.model.mae import MaskedAutoencoder  # pylint: disable=g-import-not-at-top
    model = MaskedAutoencoder(**{k: v for k, v in cfg.items()
                                 if k in MaskedAutoencoder.__dataclass_fields__})
    shapes = jax.eval_shape(lambda: model.init({'params': rng, 'mask': rng}, images))['params']
  elif kind == 'pretrain':
    from mae_jax.model.vit import Encoder  # pylint: disable=g-import-not-at-top
    encoder = Encoder(img_size=cfg['img_size'], patch_size=cfg['patch_size'],
                      embed_dim=cfg['embed_dim'], depth=cfg['depth'], num_heads=cfg['num_heads'],
                      mlp_ratio=cfg['mlp_ratio'], layer_norm_eps=cfg['layer_norm_eps'])
    shapes = {'encoder': jax.eval_shape(lambda: encoder.init(rng, images))['params']}
  else:
    shapes = _classifier_shapes(cfg, images)
  out = {}
  for path, leaf_shape in flatten(shapes).items():
    key = official_key(path)
    if key in TOKENS:
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
  missing = [k for k in expected if k not in state_dict and k not in POS_TABLES]
  if missing:
    raise ConversionError(f'The {kind} checkpoint lacks key(s) {missing}: it is incomplete.')


def _classifier_shapes(cfg: Dict[str, Any], images: Any) -> Params:
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.model import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  head = cfg['classifier']
  model = classifier_lib.classifier_from_config(cfg, head['num_classes'],
                                                global_pool=head['global_pool'])
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))['params']


def check_pos_table(name: str, table: np.ndarray, grid: Tuple[int, int]) -> float:
  """Max |table - mae_jax's sin-cos table (cls row zero)|; raises on a shape mismatch."""
  width = np.shape(table)[-1]
  expected = sincos_2d(width, grid, cls_token=True)[None]
  if tuple(np.shape(table)) != expected.shape:
    raise ConversionError(
        f'{name} has shape {tuple(np.shape(table))}, a {grid[0]}x{grid[1]} patch grid needs '
        f'{expected.shape}: the config img_size does not match the checkpoint\'s resolution.')
  return float(np.max(np.abs(np.asarray(table, np.float64) - expected)))

