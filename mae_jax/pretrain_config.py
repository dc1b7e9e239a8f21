"""The paper's pretraining recipe as a config, shared by configs/vit_{b,l,h}.py, tiny.py, demo.py.

MAE.md section 4, the same for ViT-B/L/H: AdamW betas (0.9, 0.95), weight decay 0.05
(1-D parameters and biases excluded), base lr 1.5e-4 scaled by global batch / 256, batch
4096, 40 warmup epochs then half-cycle cosine to 0 per step, mask ratio 0.75, ImageNet-1k
from TFDS with RandomResizedCrop(0.2, 1) + flip. The released weights come from 1600
epochs with norm_pix_loss, which is the default here; the paper's 800-epoch runs are
`pretrain_config(name, num_epochs=800)`.
"""
import ml_collections

from mae_jax import presets

# Top-level fields a pretraining config may hold; `pretrain.check_config` rejects others.
CONFIG_FIELDS = (
    'job', 'model', 'dataset', 'seed', 'batch_size', 'base_lr', 'min_lr', 'optimizer',
    'num_epochs', 'warmup_epochs', 'total_steps', 'warmup_steps', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'async_checkpointing',
    'visualize_every_steps', 'num_visualize', 'prefetch_batches', 'init_from',
    'grad_accum_steps')


def dataset_config(**overrides) -> ml_collections.ConfigDict:
  """The input pipeline's default dataset config with `overrides` applied."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg = input_pipeline.default_dataset_config()
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f'Unknown dataset field(s) {sorted(unknown)}; known: {sorted(cfg)}.')
  cfg.update(overrides)
  return cfg


def pretrain_config(model_name: str, num_epochs: int = 1600, norm_pix_loss: bool = True
                    ) -> ml_collections.ConfigDict:
  """The MAE pretraining recipe for `presets.model_config(model_name)`.

  Args:
    model_name: 'vit_b', 'vit_l', 'vit_h' (or 'tiny' / 'small_cpu' for tests and demos).
    num_epochs: 1600 for the released weights, 800 for most of the paper's tables.
    norm_pix_loss: per-patch normalised pixel targets (the released weights use them).
  """
  config = ml_collections.ConfigDict()
  config.job = 'pretrain'
  config.model = presets.model_config(model_name, norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
  config.dataset = dataset_config(source='tfds', name='imagenet2012', train_split='train',
                                  eval_split='validation')
  config.seed = 0

  config.batch_size = 4096  # global, over all hosts and devices: one optimiser step
  # Each device's share of the batch runs as this many sequential micro-batches whose
  # gradients are averaged (the reference's accum_iter): less activation memory, the same
  # step (masks are keyed per example, so the result does not change).
  config.grad_accum_steps = 1
  config.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
  config.min_lr = 0.0
  config.optimizer = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      # timm's add_weight_decay as the reference calls it: only ndim <= 1 and biases are
      # skipped, so the (1, 1, D) cls and mask tokens are decayed in pretraining.
      no_decay_names=()))
  config.num_epochs = num_epochs
  config.warmup_epochs = 40
  config.total_steps = -1  # > 0 overrides num_epochs
  config.warmup_steps = -1  # >= 0 overrides warmup_epochs

  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.visualize_every_steps = 10000
  config.num_visualize = 8
  config.prefetch_batches = 2
  # A params checkpoint to start from instead of a random init (e.g. a converted
  # `mae_visualize_vit_*.pth`, or an encoder-only release with a fresh decoder).
  config.init_from = None
  return config
