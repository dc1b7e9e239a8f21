"""End-to-end fine-tuning (MAE.md section 4): `--config=configs/finetune.py:vit_b`.

Arguments: vit_b | vit_l | vit_h (the paper's recipes, ImageNet-1k from TFDS), demo (the
CPU demo on the embedded photos) or cifar10 (needs --config.dataset.data_dir). Give the
pretrained encoder with --config.init_from=<pretraining workdir or checkpoint dir>;
higher resolution (e.g. ViT-H at 448) with --config.model.img_size=448.
"""
from mae_jax.jobs import recipes


def get_config(arg: str = 'vit_b'):
  return recipes.finetune_config(arg)
