"""Tiny pretraining config for tests: 32x32 crops of the embedded photos, a 2-block ViT, 6 steps.

python -m mae_jax.main --config=configs/tiny.py --workdir=/tmp/mae_tiny
"""
from mae_jax.jobs.recipes import dataset_config, pretrain_config


def get_config():
  config = pretrain_config('tiny', norm_pix_loss=False)
  config.dataset = dataset_config(source='embedded')
  config.batch_size = 16
  config.base_lr = 1.6e-2  # lr = base_lr * 16 / 256 = 1e-3
  config.total_steps = 6
  config.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.visualize_every_steps = 3
  config.num_visualize = 2
  return config
