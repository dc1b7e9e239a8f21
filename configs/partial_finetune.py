"""Partial fine-tuning (paper Figure 9): `--config=configs/partial_finetune.py:vit_l,4`.

Only the last k encoder blocks, the final norm (fc_norm) and the head train; k in
[0, depth] (0: frozen encoder). Argument `<size>,<k>` with size as in finetune.py; the
count can also be set with --config.trainable_blocks=k.
"""
from mae_jax.jobs import recipes


def get_config(arg: str = 'vit_l,1'):
  size, k = recipes.parse_partial_arg(arg)
  return recipes.partial_finetune_config(size, k)
