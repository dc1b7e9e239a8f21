"""The paper's recipes as configs, for configs/*.py: pretraining and the downstream protocols.

Pretraining, `pretrain_config(name)` (MAE.md section 4, the same for ViT-B/L/H): AdamW
betas (0.9, 0.95), weight decay 0.05 (1-D parameters and biases excluded), base lr 1.5e-4
scaled by global batch / 256, batch 4096, 40 warmup epochs then half-cycle cosine to 0 per
step, mask ratio 0.75, ImageNet-1k from TFDS with RandomResizedCrop(0.2, 1) + flip. The
released weights come from 1600 epochs with norm_pix_loss, which is the default here; the
paper's 800-epoch runs are `pretrain_config(name, num_epochs=800)`.

Downstream (MAE.md section 4): `finetune_config(size)`: end-to-end fine-tuning
(FINETUNE.md / paper Table 9), `partial_finetune_config(size, k)`: the same with only the
last k blocks trained (Figure 9), `linear_probe_config(size)`: linear probing (paper Table
10). `size` is 'vit_b', 'vit_l', 'vit_h', 'demo' (the CPU demo: the model of configs/demo.py
on the embedded photos) or 'cifar10' (the demo model on a CIFAR-10 ImageFolder: pass
--config.dataset.data_dir).

Jobs that start from a checkpoint (the downstream protocols and feature extraction) leave
the encoder's architecture in `config.model` as None placeholders (`encoder_config()`):
the job takes each one from the checkpoint's stored model config unless the config sets it
(`mae_jax.jobs.architecture`); `config.default_model`, the size's architecture, serves
where no checkpoint gives one (the random-init baseline).
"""
from typing import Optional, Tuple

import ml_collections
from ml_collections import config_dict

from mae_jax.model import presets

# Top-level fields a pretraining config may hold; `pretrain.check_config` rejects others.
CONFIG_FIELDS = (
    'job', 'model', 'dataset', 'seed', 'batch_size', 'base_lr', 'min_lr', 'optimizer',
    'num_epochs', 'warmup_epochs', 'total_steps', 'warmup_steps', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'async_checkpointing',
    'visualize_every_steps', 'num_visualize', 'prefetch_batches', 'init_from',
    'grad_accum_steps', 'parallelism', 'remat', 'monitor')

# The encoder's architecture in `config.model`: what a checkpoint's stored model config gives
# a downstream or feature-extraction job unless the config sets it.
ARCHITECTURE_FIELDS = {'img_size': int, 'patch_size': int, 'in_chans': int, 'embed_dim': int,
                       'depth': int, 'num_heads': int, 'mlp_ratio': float,
                       'layer_norm_eps': float}


def _parallelism(config: ml_collections.ConfigDict) -> None:
  # How the step runs on the devices (mae_jax/jobs/parallel.py): 'pmap' (replicated state,
  # the default), 'data' (jit over a mesh of all devices, replicated state) or 'fsdp' (jit,
  # params and optimizer state sharded over the devices: for models that do not fit
  # replicated). Results are the same in every mode; a run resumes in any mode.
  config.parallelism = 'pmap'
  # Recompute each transformer block's activations in the backward pass: less activation
  # memory for about a third more compute per step; same results.
  config.remat = False


def _with_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """`cfg` updated with `overrides`, every one of which must name an existing dataset field."""
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f'Unknown dataset field(s) {sorted(unknown)}; known: {sorted(cfg)}.')
  cfg.update(overrides)
  return cfg


def dataset_config(**overrides) -> ml_collections.ConfigDict:
  """The input pipeline's default dataset config with `overrides` applied."""
  from mae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return _with_overrides(pipeline.default_dataset_config(), overrides)


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
  _parallelism(config)
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
  config.monitor = monitor_config()
  return config


def monitor_config() -> ml_collections.ConfigDict:
  """`config.monitor`: the k-NN top-1 of the encoder every `every_steps` steps (0: off).

  The encoder's features (all patches, no masking) of `num_train_examples` labelled images
  of the train split (the memory bank) and `num_eval_examples` of the eval split, spread
  evenly over each split, read once with the eval transform and kept in host memory;
  similarity-weighted k-NN (`mae_jax.evaluators.knn`). `knn_top1` (of `pool`),
  `knn_top1_cls` and `knn_top1_mean` go to metrics.jsonl and TensorBoard at step 0, every
  `every_steps` and at the end. Empty dataset fields mean config.dataset's.
  """
  return ml_collections.ConfigDict(dict(
      every_steps=0,
      source='', name='', data_dir='', train_split='', eval_split='',
      num_train_examples=5000, num_eval_examples=1000,
      k=20, temperature=0.07, pool='mean', batch_size=256))


def encoder_config(**fixed) -> ml_collections.ConfigDict:
  """`config.model` of a job that starts from a checkpoint: every architecture field a None
  placeholder (the checkpoint's value unless set), `fixed` ones set, compute dtype float32."""
  cfg = ml_collections.ConfigDict(
      {k: config_dict.placeholder(t) for k, t in ARCHITECTURE_FIELDS.items()})
  cfg.dtype = 'float32'
  unknown = set(fixed) - set(cfg)
  if unknown:
    raise ValueError(f'Unknown encoder field(s) {sorted(unknown)}; known: {sorted(cfg)}.')
  cfg.update(fixed)
  return cfg


def architecture(model_cfg) -> ml_collections.ConfigDict:
  """The architecture fields of a full `config.model` (e.g. a preset's)."""
  return ml_collections.ConfigDict({k: model_cfg[k] for k in ARCHITECTURE_FIELDS})


# ---------------------------------------------------------------------------------------
# Downstream protocols.

# Per size: (base lr, layer decay, epochs, drop path), batch 1024 (MAE.md section 4).
FINETUNE_RECIPES = {
    'vit_b': (5e-4, 0.65, 100, 0.1),
    'vit_l': (1e-3, 0.75, 50, 0.2),
    'vit_h': (1e-3, 0.75, 50, 0.3),
}
LINEAR_PROBE_EPOCHS = {'vit_b': 90, 'vit_l': 50, 'vit_h': 50}
PAPER_SIZES = tuple(FINETUNE_RECIPES)
SMALL_SIZES = ('demo', 'cifar10')
# The encoder of configs/demo.py (the pretraining CPU demo: 64 px, 8 px patches); CIFAR-10
# keeps its 32 px with 4 px patches (the same 64 tokens, so the same encoder but the patch
# embedding): pretrain it with configs/demo.py and --config.model.img_size=32
# --config.model.patch_size=4.
SMALL_MODELS = {'demo': dict(img_size=64, patch_size=8), 'cifar10': dict(img_size=32, patch_size=4)}


def _dataset(size: str) -> ml_collections.ConfigDict:
  if size == 'demo':
    return dataset_config(source='embedded', train_split='train', eval_split='test')
  if size == 'cifar10':
    # ImageFolder root holding train/ and test/ (the unpacked cifar10-jpeg.tar.gz).
    # ImageNet mean/std as in pretraining, so the encoder sees the inputs it learned on.
    return dataset_config(source='imagefolder', train_split='train', eval_split='test')
  return dataset_config(source='tfds', name='imagenet2012', train_split='train',
                        eval_split='validation')


def _default_model(size: str) -> ml_collections.ConfigDict:
  return architecture(presets.model_config('small_cpu', **SMALL_MODELS[size])
                      if size in SMALL_SIZES else presets.model_config(size))


def _parse_size(size: str) -> str:
  if size not in PAPER_SIZES + SMALL_SIZES:
    raise ValueError(f'Unknown config argument {size!r}: use one of {PAPER_SIZES + SMALL_SIZES}, '
                     f'e.g. --config=configs/finetune.py:vit_b.')
  return size


def _common(size: str, job: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = job
  # None: the architecture of the checkpoint in init_from; set a field to override it
  # (img_size: another resolution, the position table is interpolated).
  config.model = encoder_config()
  # Where no checkpoint gives an architecture (allow_random_init without init_from).
  config.default_model = _default_model(size)
  config.dataset = _dataset(size)
  config.num_classes = config_dict.placeholder(int)  # None: from the dataset
  # A pretraining workdir, one of its checkpoints/<step> dirs, or a save_params dir
  # (e.g. a converted PyTorch release). Required unless allow_random_init.
  config.init_from = config_dict.placeholder(str)
  config.allow_random_init = False  # the random-init baseline, on purpose only
  config.eval_only = False
  config.eval_from = config_dict.placeholder(str)  # eval_only: default the workdir's latest
  config.seed = 0
  _parallelism(config)
  config.total_steps = -1  # > 0 overrides num_epochs
  config.warmup_steps = -1  # >= 0 overrides warmup_epochs
  config.log_every_steps = 100
  config.eval_every_steps = -1  # <= 0: once per epoch, as the reference
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.async_checkpointing = True
  config.prefetch_batches = 2
  return config


def _small_schedule(config: ml_collections.ConfigDict, size: str, batch: int,
                    log_every: int, epochs: int = 1, steps: int = -1) -> None:
  """CPU-sized runs. The embedded set has one training photo per class (fewer than a
  batch), so the demo counts steps; warmup is a tenth of the run, eval every third."""
  config.batch_size = batch
  config.eval_batch_size = 256 if size == 'cifar10' else 72
  config.num_epochs = epochs
  config.log_every_steps = log_every
  config.checkpoint_every_steps = 500
  if steps > 0:
    config.total_steps = steps
    config.warmup_steps = steps // 10
    config.eval_every_steps = steps // 3


def finetune_config(size: str, trainable_blocks: Optional[int] = None
                    ) -> ml_collections.ConfigDict:
  """End-to-end fine-tuning recipe for `size` (trainable_blocks=k: partial fine-tuning)."""
  size = _parse_size(size)
  config = _common(size, 'finetune')
  # None: every parameter trains. k: the last k blocks + final norm + head (Figure 9).
  config.trainable_blocks = config_dict.placeholder(int)
  config.trainable_blocks = trainable_blocks
  config.global_pool = True
  config.head_init_std = 2e-5
  config.batch_size = 1024
  config.eval_batch_size = 1024
  base_lr, decay, epochs, drop_path = FINETUNE_RECIPES.get(size, (1e-3, 0.75, 100, 0.1))
  config.base_lr = base_lr  # lr = base_lr * batch_size / 256
  config.layer_decay = decay
  config.drop_path_rate = drop_path
  config.num_epochs = epochs
  config.warmup_epochs = 5.0
  config.min_lr = 1e-6
  config.weight_decay = 0.05
  config.b1, config.b2 = 0.9, 0.999
  config.mixup, config.cutmix = 0.8, 1.0  # alphas; both 0 turns mixup/cutmix off
  config.mixup_switch_prob = 0.5
  # Mixup pairs examples within a group: 0 = each device's batch (the reference mixes
  # each GPU's 32 images); 32 = groups of 32 by global index, the reference's pairing on
  # any device count (the per-device batch must be a multiple).
  config.mixup_group_size = 0
  config.label_smoothing = 0.1
  if size in SMALL_SIZES:
    # Two CPU cores, minutes: 4 blocks, so a milder layer decay than ViT-B's 12; the
    # short schedules want a larger lr (1e-3 absolute, as the pretraining demo).
    config.layer_decay = 0.75
    config.drop_path_rate = 0.1
    if size == 'demo':
      _small_schedule(config, size, batch=64, steps=300, log_every=50)
      config.base_lr = 4e-3
    else:
      _small_schedule(config, size, batch=256, log_every=50, epochs=2)
      config.warmup_epochs = 0.2
      config.base_lr = 1e-3
  return config


def partial_finetune_config(size: str, trainable_blocks: int) -> ml_collections.ConfigDict:
  """Fine-tuning recipe with only the last `trainable_blocks` blocks (plus norm, head) trained.

  The paper keeps the fine-tuning recipe and picks 50, 100 or 200 epochs per block
  count (fewer blocks want longer schedules): set --config.num_epochs accordingly.
  """
  return finetune_config(size, trainable_blocks)


def linear_probe_config(size: str) -> ml_collections.ConfigDict:
  """Linear-probe recipe for `size`: LARS, base lr 0.1, batch 16384, BN + linear head."""
  size = _parse_size(size)
  config = _common(size, 'linear_probe')
  config.global_pool = False  # the normed cls token, main_linprobe.py's default
  config.head_init_std = 0.01
  config.drop_path_rate = 0.0  # frozen encoder: no stochastic depth
  config.batch_size = 16384
  config.eval_batch_size = 1024
  config.base_lr = 0.1
  config.min_lr = 0.0
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.trust_coefficient = 0.001
  config.num_epochs = LINEAR_PROBE_EPOCHS.get(size, 90)
  config.warmup_epochs = 10.0
  if size in SMALL_SIZES:
    # LARS scales each kernel step by trust * |w| / |g|: the step is relative to the
    # weights whatever the batch, so small batches keep the paper's absolute lr
    # (0.1 * 16384 / 256 = 6.4) instead of shrinking it by the linear scaling rule.
    if size == 'demo':
      _small_schedule(config, size, batch=64, steps=300, log_every=50)
    else:
      _small_schedule(config, size, batch=256, log_every=50, epochs=2)
      config.warmup_epochs = 0.2
    config.base_lr = 6.4 * 256 / config.batch_size
  return config


def parse_partial_arg(arg: str) -> Tuple[str, int]:
  """'vit_l,4' or 'vit_l,k=4' or 'vit_l' (k = 1) -> ('vit_l', 4)."""
  size, _, k = arg.partition(',')
  k = k.split('=')[-1].strip() if k else '1'
  try:
    return size.strip(), int(k)
  except ValueError:
    raise ValueError(f'Cannot read the block count from {arg!r}: write e.g. '
                     f'--config=configs/partial_finetune.py:vit_l,4.') from None


# ---------------------------------------------------------------------------------------
# Semantic segmentation (ADE20K in the paper, MAE.md section 5: UperNet, mIoU 48.1 ViT-B,
# 53.6 ViT-L). MAE.md gives no recipe; the schedule and optimiser here are those of
# mmsegmentation's MAE reproduction (configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_
# ade20k.py): 512 px crops, batch 16, 160k iterations, AdamW (0.9, 0.999) lr 1e-4 wd 0.05,
# layer decay 0.65, poly (power 1) after 1500 linear warmup iterations from 1e-6 of the lr,
# drop path 0.1, ADE20K with reduce_zero_label (150 classes). mmseg has no MAE ViT-L
# config: ViT-L keeps that lr and takes layer decay 0.75 and drop path 0.2 from the
# paper's ViT-L fine-tuning recipe.
SEGMENTATION_SIZES = ('demo', 'vit_b', 'vit_l')
# Per size: (layer decay, drop path).
SEGMENTATION_RECIPES = {'vit_b': (0.65, 0.1), 'vit_l': (0.75, 0.2)}


def segmentation_dataset_config(**overrides) -> ml_collections.ConfigDict:
  """The segmentation input's default dataset config with `overrides` applied."""
  from mae_jax.data import segmentation  # pylint: disable=g-import-not-at-top
  return _with_overrides(segmentation.default_dataset_config(), overrides)


def segmentation_config(size: str) -> ml_collections.ConfigDict:
  """The segmentation fine-tuning recipe: 'vit_b' / 'vit_l' (ADE20K at 512 px) or 'demo'.

  'demo' is the CPU demo: the encoder of configs/demo.py (64 px, 8 px patches) on the
  synthetic scenes (mae_jax.data.scenes, 6 classes), minutes on two cores.
  """
  if size not in SEGMENTATION_SIZES:
    raise ValueError(f'Unknown config argument {size!r}: use one of {SEGMENTATION_SIZES}, '
                     'e.g. --config=configs/segmentation.py:vit_b.')
  config = ml_collections.ConfigDict()
  config.job = 'segmentation'
  config.init_from = config_dict.placeholder(str)  # as the other downstream jobs
  config.allow_random_init = False
  config.eval_only = False
  config.eval_from = config_dict.placeholder(str)
  config.seed = 0
  _parallelism(config)
  config.num_classes = config_dict.placeholder(int)  # None: from the dataset (scenes: 6)
  config.pyramid_channels = 256  # ViTDet's simple pyramid width
  config.pyramid_strides = (4, 8, 16, 32)
  config.head_channels = 128  # the semantic FPN head (mmseg FPNHead)
  config.schedule = 'poly'  # or 'cosine' (half-cycle, to min_lr)
  config.poly_power = 1.0
  config.warmup_ratio = 1e-6  # poly: the first step's lr is this fraction of the warmed-up one
  config.min_lr = 0.0
  config.weight_decay = 0.05
  config.b1, config.b2 = 0.9, 0.999
  config.log_every_steps = 50
  config.checkpoint_every_steps = 4000
  config.keep_checkpoints = 2
  config.async_checkpointing = True
  config.prefetch_batches = 2
  if size == 'demo':
    config.model = presets.model_config('small_cpu', **SMALL_MODELS['demo'])
    config.dataset = segmentation_dataset_config(source='scenes')
    config.pyramid_channels = 64
    config.head_channels = 64
    config.batch_size = 32
    config.eval_batch_size = 64
    config.total_steps = 600
    config.warmup_steps = 50
    config.base_lr = 8e-3  # lr = base_lr * 32 / 256 = 1e-3: a short run wants a large lr
    config.layer_decay = 0.75  # 4 blocks: milder than ViT-B's 0.65 over 12
    config.drop_path_rate = 0.1
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    return config
  config.model = presets.model_config(size, img_size=512)
  # ADE20K as released (ADEChallengeData2016.zip): --config.dataset.data_dir=<its root>.
  config.dataset = segmentation_dataset_config(
      source='folder', train_split='training', eval_split='validation',
      reduce_zero_label=True)
  config.num_classes = 150
  config.batch_size = 16
  config.eval_batch_size = 16
  config.total_steps = 160_000
  config.warmup_steps = 1500
  config.base_lr = 1e-4 * 256 / 16  # lr = base_lr * batch / 256 = 1e-4 at batch 16
  config.layer_decay, config.drop_path_rate = SEGMENTATION_RECIPES[size]
  config.eval_every_steps = 16_000
  return config


# ---------------------------------------------------------------------------------------
# Feature extraction.

EXTRACT_DATASETS = {'demo': 'demo', 'cifar10': 'cifar10', 'imagenet': 'vit_b'}


def knn_config() -> ml_collections.ConfigDict:
  """k-NN evaluation (DINO's protocol): k neighbours, votes exp(cosine / temperature)."""
  return ml_collections.ConfigDict(dict(k=20, temperature=0.07, pool='mean'))


def extract_features_config(dataset: str = 'demo') -> ml_collections.ConfigDict:
  """Features of a pretrained encoder on a dataset's train and eval splits, k-NN and a fast
  logistic-regression probe on them (`mae_jax.jobs.extract_features`).

  Args:
    dataset: 'demo' (embedded photos), 'cifar10' (ImageFolder: pass
      --config.dataset.data_dir) or 'imagenet' (TFDS imagenet2012); any other data with
      --config.dataset.* overrides.
  """
  if dataset not in EXTRACT_DATASETS:
    raise ValueError(f'Unknown config argument {dataset!r}: use one of '
                     f'{sorted(EXTRACT_DATASETS)}, e.g. --config=configs/extract_features.py:'
                     f'cifar10.')
  size = EXTRACT_DATASETS[dataset]
  config = ml_collections.ConfigDict()
  config.job = 'extract_features'
  config.model = encoder_config()  # None: the checkpoint's architecture
  config.default_model = _default_model(size)  # allow_random_init without init_from
  # config.dataset.train_split and eval_split, each to <workdir>/features_<split>.npz.
  config.dataset = _dataset(size)
  config.splits = 'train,eval'  # which of the two to extract ('eval': only the eval split)
  config.init_from = config_dict.placeholder(str)
  config.allow_random_init = False  # a randomly initialised encoder's features (baseline)
  config.seed = 0
  config.batch_size = 1024 if dataset == 'imagenet' else 256  # global, over all devices
  # With labelled train and eval splits: k-NN top-1 of the eval split against the train split.
  config.knn = knn_config()
  # And a multinomial logistic regression on standardised features, scikit-learn's
  # LogisticRegression(C=C) objective fitted by L-BFGS (mae_jax.evaluators.logistic).
  config.logreg = ml_collections.ConfigDict(dict(
      enabled=dataset != 'imagenet', C=1.0, max_iter=1000, tol=1e-5))
  config.log_every_seconds = 30.0
  return config
