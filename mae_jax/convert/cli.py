"""The converter's command line.

  python -m mae_jax.convert --input FILE.pth --output DIR      PyTorch file -> orbax checkpoint
  python -m mae_jax.convert --input DIR --output FILE.pth [--format official|hf|hf_classic]

The direction follows from `--input`: a file is imported, a directory (a checkpoint written
by `checkpoint.save_params`, a step directory or a training workdir) is exported. Bad input
ends with exit status 2 and a one-line message; an existing output is never overwritten.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from mae_jax.convert.names import LAYOUTS, ConversionError, flatten


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (2 with a one-line message on bad input)."""
  # Imported here: orbax is not needed to use the converter's functions, and the package
  # imports this module.
  from mae_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
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
      state = convert.export_pytorch_checkpoint(args.output, params, model_config, args.format)
      print(f'Wrote {len(state)} tensors in the {args.format} naming to {args.output}.')
      return 0
    converted = convert.load_pytorch_checkpoint(
        args.input, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
        img_size=_img_size(args.img_size), layer_norm_eps=args.layer_norm_eps,
        norm_pix_loss=args.norm_pix_loss, pos_embed=args.pos_embed)
    checkpoint.save_params(args.output, converted.params, converted.model_config)
  except (ConversionError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = sum(int(np.prod(np.shape(v))) for v in flatten(converted.params).values())
  diffs = ', '.join(f'{k} {v:.2g}' for k, v in converted.pos_embed_max_diff.items()) or 'none'
  cfg = converted.model_config
  print(f'Converted a {converted.kind} checkpoint ({converted.layout} naming, {count:,} params): '
        f'img_size {cfg["img_size"]}, patch {cfg["patch_size"]}, width {cfg["embed_dim"]}, depth '
        f'{cfg["depth"]}, heads {cfg["num_heads"]}; position tables vs sin-cos (max abs diff): '
        f'{diffs}. Wrote {args.output}.')
  return 0


