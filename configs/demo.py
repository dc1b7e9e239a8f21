"""CPU demo: MAE pretraining on the photos shipped with scikit-image; no download, minutes on a CPU.

python -m mae_jax.main --config=configs/demo.py --workdir=/tmp/mae_demo

A small ViT (presets 'small_cpu': width 128, 4 blocks; decoder width 64, 2 blocks) on
64x64 crops cut into 8x8 patches (the same 64 tokens as 224 px / 28 px patches), the
paper's masking (75%), optimiser and schedule, with a learning rate and length made for
a short run. Reconstructions of held-out tiles land in <workdir>/reconstructions/; the
final checkpoint is where the linear-probe and fine-tuning demos start.
"""
from mae_jax.jobs.recipes import dataset_config, pretrain_config
from mae_jax.model import presets


def get_config():
  config = pretrain_config('small_cpu', norm_pix_loss=False)  # raw pixels: pictures read directly
  config.model = presets.model_config('small_cpu', img_size=64, patch_size=8)
  config.dataset = dataset_config(source='embedded')
  config.batch_size = 64
  config.base_lr = 8e-3  # lr = base_lr * 64 / 256 = 2e-3: a short run wants a large lr
  config.total_steps = 1200
  config.warmup_steps = 60
  config.log_every_steps = 50
  config.checkpoint_every_steps = 300
  config.visualize_every_steps = 300
  config.num_visualize = 8
  return config
