"""MAE ViT-B/16 pretraining on ImageNet-1k, the paper's recipe (MAE.md section 4).

python -m mae_jax.main --config=configs/vit_b.py --workdir=gs://bucket/mae_vit_b \
    --config.dataset.manual_dir=/path/to/imagenet_tars --config.dataset.download=True

The released weights: 1600 epochs with norm_pix_loss (the default). The paper's
800-epoch tables: --config=configs/vit_b.py:800. Global batch 4096 over all devices;
lr = 1.5e-4 * batch / 256 with 40 warmup epochs then half-cycle cosine.
`download=True` prepares ImageNet once from the manually downloaded tars (README, Data).
"""
from mae_jax.jobs.recipes import pretrain_config


def get_config(epochs: str = '1600'):
  return pretrain_config('vit_b', num_epochs=int(epochs))
