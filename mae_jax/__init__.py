"""mae_jax: Masked Autoencoders (He et al.) in JAX/Flax.

The package follows the data's way through the program; each subpackage imports only
those listed above it (`tests/test_layout.py` checks it):

    model/    the networks: patches, sin-cos tables, masking, ViT, MAE, classifier, presets
    data/     images in, batches out: sources, tf.data pipeline, augmentation, mixup
    evaluators/  frozen features in, numbers out: k-NN, the logistic-regression probe
    io/       what a run leaves on disk: checkpoints, metrics logs, reconstruction figures
    convert/  PyTorch checkpoints (official release, Hugging Face) in and out
    jobs/     pretraining, linear probing, fine-tuning, feature extraction, recipes, optimisers
    main.py   the entry point, `python -m mae_jax.main --config=... --workdir=...`

The names below are imported on first use, so `import mae_jax.data` does not load the
model, and `import mae_jax` loads nothing heavy.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Dict

__version__ = '0.1.0'

_API = {  # public name -> the module that defines it
    'MaskedAutoencoder': 'mae_jax.model.mae',
    'mae_loss': 'mae_jax.model.mae',
    'normalize_patches': 'mae_jax.model.mae',
    'Encoder': 'mae_jax.model.vit',
    'ViTBackbone': 'mae_jax.model.backbone',
    'Segmenter': 'mae_jax.model.segmenter',
    'features': 'mae_jax.model.features',
    'load_config': 'mae_jax.jobs.config_file',
    'random_masking': 'mae_jax.model.masking',
    'patchify': 'mae_jax.model.patches',
    'unpatchify': 'mae_jax.model.patches',
    'sincos_2d': 'mae_jax.model.pos_embed',
}
__all__ = sorted(_API)

# Modules of the earlier flat layout and where they live now. The old paths keep working
# (`mae_jax.checkpoint.load_params`, `from mae_jax import presets`, `import
# mae_jax.input_pipeline`) and give the same module objects as the new ones.
MOVED: Dict[str, str] = {
    'patches': 'mae_jax.model.patches',
    'pos_embed': 'mae_jax.model.pos_embed',
    'masking': 'mae_jax.model.masking',
    'vit': 'mae_jax.model.vit',
    'mae': 'mae_jax.model.mae',
    'classifier': 'mae_jax.model.classifier',
    'presets': 'mae_jax.model.presets',
    'input_pipeline': 'mae_jax.data.pipeline',
    'data_sources': 'mae_jax.data.sources',
    'preprocess': 'mae_jax.data.preprocess',
    'randaugment': 'mae_jax.data.randaugment',
    'mixup': 'mae_jax.data.mixup',
    'checkpoint': 'mae_jax.io.checkpoint',
    'metrics_log': 'mae_jax.io.metrics_log',
    'visualize': 'mae_jax.io.visualize',
    'pretrain': 'mae_jax.jobs.pretrain',
    'pretrain_config': 'mae_jax.jobs.recipes',
    'downstream_config': 'mae_jax.jobs.recipes',
    'linear_probe': 'mae_jax.jobs.linear_probe',
    'finetune': 'mae_jax.jobs.finetune',
    'downstream_train': 'mae_jax.jobs.downstream',
    'downstream': 'mae_jax.jobs.classification',
    'optim': 'mae_jax.jobs.optim',
    'layer_decay': 'mae_jax.jobs.layer_decay',
}


def __getattr__(name: str) -> Any:
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
  elif name in MOVED:
    value = importlib.import_module(MOVED[name])
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_API) | set(MOVED))


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """`import mae_jax.<old name>` binds the module at its new path (the same object)."""

  def __init__(self):
    self._specs = {}

  def find_spec(self, fullname, path=None, target=None):
    package, _, name = fullname.rpartition('.')
    if package == __name__ and name in MOVED:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    module = importlib.import_module(MOVED[spec.name.rpartition('.')[2]])
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module):
    # Importing under the old name replaced the module's __spec__; give it back.
    module.__spec__ = self._specs.pop(module.__spec__.name)


sys.meta_path.append(_MovedModules())
