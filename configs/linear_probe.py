"""Linear probing (MAE.md section 4): `--config=configs/linear_probe.py:vit_b`.

Arguments: vit_b | vit_l | vit_h (the paper's recipes, ImageNet-1k from TFDS), demo or
cifar10 (needs --config.dataset.data_dir). Needs --config.init_from=<pretraining workdir
or checkpoint dir>.
"""
from mae_jax.jobs import recipes


def get_config(arg: str = 'vit_b'):
  return recipes.linear_probe_config(arg)
