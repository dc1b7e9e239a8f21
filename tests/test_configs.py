"""Every config file loads, and the paper's pretraining configs hold its recipe and build at full size."""
import pathlib

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags

from mae_jax import MaskedAutoencoder

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def _load(path: str):
  module_path, _, arg = path.partition(':')
  module = config_flags.config_flags._LoadConfigModule('config', module_path)  # pylint: disable=protected-access
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('name,width,patch', [('vit_b', 768, 16), ('vit_l', 1024, 16), ('vit_h', 1280, 14)])
def test_paper_pretraining_recipe(name, width, patch):
  config = _load(str(CONFIGS / f'{name}.py'))
  assert config.job == 'pretrain'
  assert (config.model.embed_dim, config.model.patch_size) == (width, patch)
  assert (config.model.decoder_embed_dim, config.model.decoder_depth) == (512, 8)
  assert config.model.mask_ratio == 0.75 and config.model.norm_pix_loss
  assert config.batch_size == 4096 and config.base_lr == 1.5e-4
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.weight_decay) == (0.9, 0.95, 0.05)
  assert (config.warmup_epochs, config.num_epochs) == (40, 1600)
  assert _load(str(CONFIGS / f'{name}.py') + ':800').num_epochs == 800
  assert config.dataset.name == 'imagenet2012'
  model = MaskedAutoencoder(**config.model)
  out = jax.eval_shape(
      lambda x: model.init_with_output({'params': jax.random.key(0), 'mask': jax.random.key(1)}, x)[0],
      jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  loss, pred, mask = out
  assert pred.shape == (2, (224 // patch) ** 2, patch * patch * 3) and mask.shape == pred.shape[:2]


def test_every_config_file_loads():
  files = sorted(p for p in CONFIGS.glob('*.py') if not p.name.startswith('_'))
  assert files
  for path in files:
    config = _load(str(path))
    assert config.job in ('pretrain', 'linear_probe', 'finetune', 'extract_features'), path.name
    assert 'model' in config, path.name
