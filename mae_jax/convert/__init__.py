"""PyTorch MAE checkpoints <-> mae_jax params: the official release and Hugging Face ViTMAE.

Import (`from_state_dict`, `load_pytorch_checkpoint`): any of the three namings (official
release / timm, Hugging Face transformers >= 5, classic Hugging Face hub names; see `names`)
and any of the release's kinds (encoder-only `mae_pretrain_*`, encoder + decoder `*_full` /
`mae_visualize_*`, fine-tuned classifiers with `fc_norm` and `head`) is detected from the
keys; the model config is read from the shapes (`shapes`); every tensor is checked against
the mae_jax model and the stored position tables against mae_jax's sin-cos tables.

Export (`to_state_dict`, `export_pytorch_checkpoint`): official naming (`{'model': sd}`,
loadable by the MAE release and timm-style ViTs) or Hugging Face naming.

torch is imported only by the functions that read or write files (`files`), which never run
code from a checkpoint.

Command line (`cli`):
  python -m mae_jax.convert --input mae_pretrain_vit_base.pth --output /ckpt/vit_b
  python -m mae_jax.convert --input /ckpt/vit_b --output vit_b.pth --format official|hf
"""
import dataclasses
import warnings
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mae_jax.convert.cli import main
from mae_jax.convert.files import as_numpy, read_state_dict, write_state_dict
from mae_jax.convert.names import (LAYOUTS, POS_TABLES, ConversionError, Params, StateDict,
                                   detect_layout, flatten, hf_to_official, official_to_hf,
                                   official_to_params, params_to_official, to_official)
from mae_jax.convert.shapes import (KINDS, POS_TABLE_TOLERANCE, check_pos_table, check_shapes,
                                    checkpoint_kind, classifier_record, expected_shapes,
                                    infer_model_config)
from mae_jax.model.patches import Size2D, grid_size
from mae_jax.model.pos_embed import sincos_2d

__all__ = ['ConversionError', 'Converted', 'from_state_dict', 'to_state_dict',
           'load_pytorch_checkpoint', 'export_pytorch_checkpoint', 'read_state_dict',
           'write_state_dict', 'hf_to_official', 'official_to_hf', 'official_to_params',
           'params_to_official', 'to_official', 'detect_layout', 'checkpoint_kind',
           'infer_model_config', 'expected_shapes', 'check_shapes', 'check_pos_table',
           'flatten', 'main', 'KINDS', 'LAYOUTS', 'POS_TABLES', 'POS_TABLE_TOLERANCE']


@dataclasses.dataclass
class Converted:
  """The result of `from_state_dict`.

  params: the mae_jax param tree (numpy float32 leaves).
  model_config: the model fields (`MaskedAutoencoder(**model_config)` for 'pretrain' /
    'full'; classifiers add a 'classifier' record as the downstream jobs store it).
  kind: 'pretrain' (encoder only), 'full' (encoder + decoder) or 'classifier'.
  layout: the naming the state dict used: 'official', 'hf' or 'hf_classic'.
  pos_embed_max_diff: per stored table, max |stored - mae_jax sin-cos table|.
  """
  params: Params
  model_config: Dict[str, Any]
  kind: str
  layout: str
  pos_embed_max_diff: Dict[str, float]


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
  official, layout = to_official({k: as_numpy(v) for k, v in state_dict.items()})
  kind = checkpoint_kind(official)
  if model_config is None:
    cfg = infer_model_config(official, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                             img_size=img_size, layer_norm_eps=layer_norm_eps,
                             norm_pix_loss=norm_pix_loss)
  else:
    cfg = dict(model_config)
    if kind == 'classifier' and 'classifier' not in cfg:
      cfg['classifier'] = classifier_record(official)
  check_shapes(official, cfg, kind)
  grid = grid_size(cfg['img_size'], cfg['patch_size'])
  diffs = {name: check_pos_table(name, official[name], grid)
           for name in POS_TABLES if name in official}
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
    warnings.warn(message + ' Using mae_jax\'s own table instead.')
  tensors = {k: v for k, v in official.items()
             if k not in POS_TABLES or (k == 'pos_embed' and keep)}
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

