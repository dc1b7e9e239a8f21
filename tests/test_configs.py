"""Every config file loads, and the paper's pretraining configs hold its recipe and build at full size."""
import pathlib

from absl import flags
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from ml_collections import config_flags

import mae_jax
from mae_jax import MaskedAutoencoder

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# Every config file, and the arguments its docstring and README name.
SPECS = ['demo.py', 'tiny.py', 'vit_b.py', 'vit_b.py:800', 'vit_l.py', 'vit_h.py:800',
         'linear_probe.py', 'linear_probe.py:demo', 'linear_probe.py:cifar10',
         'finetune.py', 'finetune.py:vit_h', 'finetune.py:demo', 'partial_finetune.py',
         'partial_finetune.py:vit_l,4', 'partial_finetune.py:demo,k=2', 'segmentation.py',
         'segmentation.py:vit_b', 'segmentation.py:vit_l',
         'extract_features.py', 'extract_features.py:cifar10', 'extract_features.py:imagenet']


def _load(path: str):
  return mae_jax.load_config(path)


def _from_flag(spec: str):
  """What `python -m mae_jax.main --config=<spec>` gets (main.py defines the flag so)."""
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                           lock_config=True)
  flag_values(['prog', f'--config={spec}'])
  return holder.value


def test_every_config_file_is_listed():
  names = {p.name for p in CONFIGS.glob('*.py') if not p.name.startswith('_')}
  assert names == {s.partition(':')[0] for s in SPECS}


@pytest.mark.parametrize('spec', SPECS)
def test_load_config_gives_what_the_config_flag_gives(spec):
  path = str(CONFIGS / spec)
  loaded = mae_jax.load_config(path)
  assert loaded.to_dict() == _from_flag(path).to_dict()
  assert loaded.is_locked
  file, _, arg = path.partition(':')
  if arg:  # the argument after the colon or as the second parameter: the same config
    assert mae_jax.load_config(file, arg).to_dict() == loaded.to_dict()


def test_load_config_locks_like_the_flag_and_can_leave_unlocked():
  config = mae_jax.load_config(CONFIGS / 'demo.py')  # a pathlib.Path works too
  config.total_steps = 5  # existing fields are set as --config.total_steps=5 would
  with pytest.raises(AttributeError, match='total_step'):
    config.total_step = 5  # a misspelt field is refused, not silently added
  unlocked = mae_jax.load_config(str(CONFIGS / 'demo.py'), lock=False)
  unlocked.new_field = 1
  assert unlocked.new_field == 1


def test_load_config_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'configs/no_such\.py' not found"):
    mae_jax.load_config('configs/no_such.py')
  with pytest.raises(ValueError, match='given twice'):
    mae_jax.load_config(str(CONFIGS / 'finetune.py:vit_b'), 'vit_l')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  with pytest.raises(ValueError, match='has no get_config'):
    mae_jax.load_config(str(tmp_path / 'empty.py'))
  (tmp_path / 'none.py').write_text('def get_config():\n  pass\n')
  with pytest.raises(ValueError, match='returned NoneType'):
    mae_jax.load_config(str(tmp_path / 'none.py'))
  with pytest.raises(ValueError, match="Unknown config argument 'vit_q'"):
    mae_jax.load_config(str(CONFIGS / 'finetune.py:vit_q'))  # the file's own check


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
    assert config.job in ('pretrain', 'linear_probe', 'finetune', 'segmentation',
                          'extract_features'), path.name
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
