"""Every config file loads, and the paper's pretraining configs hold its recipe and build at full size."""
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
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
    assert config.job in ('pretrain', 'linear_probe', 'finetune', 'segmentation'), path.name
    assert 'model' in config, path.name


@pytest.mark.parametrize('size,width,depth,decay,drop_path', [('vit_b', 768, 12, 0.65, 0.1),
                                                              ('vit_l', 1024, 24, 0.75, 0.2)])
def test_segmentation_configs_build_at_512(size, width, depth, decay, drop_path):
  """The ADE20K configs (mmseg's MAE recipe: 512 px, batch 16, 160k iterations, lr 1e-4,
  poly after 1500 warmup iterations) build the segmenter at full size, abstractly."""
  from mae_jax.jobs import layer_decay
  from mae_jax.jobs import optim
  from mae_jax.jobs import segmentation
  config = _load(str(CONFIGS / 'segmentation.py') + ':' + size)
  assert config.job == 'segmentation' and config.num_classes == 150
  assert (config.model.img_size, config.model.embed_dim, config.model.depth) == (512, width, depth)
  assert config.dataset.source == 'folder' and config.dataset.reduce_zero_label
  assert (config.dataset.train_split, config.dataset.eval_split) == ('training', 'validation')
  assert (config.batch_size, config.total_steps, config.warmup_steps) == (16, 160_000, 1500)
  assert optim.scaled_lr(config.base_lr, config.batch_size) == pytest.approx(1e-4)
  assert (config.layer_decay, config.drop_path_rate, config.schedule) == (decay, drop_path, 'poly')
  config.allow_random_init = True
  segmentation.check_config(config)
  model = segmentation.build_model(config, config.num_classes)
  params = jax.eval_shape(segmentation.init_params, model, jax.random.PRNGKey(0))
  assert params['encoder']['pos_embed'].shape == (1, 1 + 32 * 32, width)
  encoder_size = sum(x.size for x in jax.tree.leaves(params['encoder']))
  assert encoder_size == pytest.approx({'vit_b': 86e6, 'vit_l': 304e6}[size], rel=0.01)
  logits = jax.eval_shape(lambda p, x: model.apply({'params': p}, x), params,
                          jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32))
  assert logits.shape == (2, 512, 512, 150)
  scales = traverse_util.flatten_dict(layer_decay.layer_lr_scales(params, depth, decay))
  assert scales[('encoder', 'patch_embed', 'kernel')] == pytest.approx(decay ** (depth + 1))
  assert scales[('encoder', 'blocks_0', 'attn', 'qkv', 'kernel')] == pytest.approx(decay ** depth)
  assert {v for k, v in scales.items() if k[0] in ('pyramid', 'head')} == {1.0}
