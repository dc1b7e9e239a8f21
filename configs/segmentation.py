"""Semantic segmentation on the MAE encoder: `--config=configs/segmentation.py:ARG`.

Arguments: vit_b | vit_l (ADE20K at 512 px: give --config.dataset.data_dir=<the unpacked
ADEChallengeData2016>), or demo (the synthetic scenes, a CPU demo). The encoder comes from
--config.init_from=<pretraining workdir or checkpoint dir>; --config.allow_random_init=True
for the random-init baseline.

python -m mae_jax.main --config=configs/segmentation.py:demo --workdir=/tmp/seg_demo \
  --config.init_from=/tmp/mae_scenes
"""
from mae_jax.jobs import recipes


def get_config(arg: str = 'demo'):
  return recipes.segmentation_config(arg)
