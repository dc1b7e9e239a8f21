"""The segmentation job end to end on the synthetic scenes (tiny ViT, 32 px, 8 devices): a short
run, a resume under another parallelism reaching the same params, eval-only reproducing the
logged mIoU, and bad input stopping the job before it trains."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from mae_jax.data import scenes
from mae_jax.data import segmentation as seg_data
from mae_jax.io import checkpoint
from mae_jax.io import curves
from mae_jax.jobs import recipes
from mae_jax.jobs import segmentation as seg_job
from mae_jax.model import presets
from mae_jax.model.vit import Encoder
from test_segmentation import write_folder  # tests/ is on sys.path under pytest


# The tiny preset made smaller still (32 px, 8 px patches, one block): the job tests time
# compilation more than anything else.
SMALL = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(dict(tree)), sep='/')


def run_config(**overrides):
  config = recipes.segmentation_config('demo')
  config.model = presets.model_config('tiny', **SMALL)
  config.dataset.update(dict(scenes_train=16, scenes_eval=8))
  config.update(dict(batch_size=8, eval_batch_size=8, total_steps=4, warmup_steps=1,
                     eval_every_steps=4, checkpoint_every_steps=2, log_every_steps=2,
                     pyramid_channels=8, head_channels=8, async_checkpointing=False))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
  enc = Encoder(img_size=32, **SMALL)
  params = jax.jit(enc.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))['params']
  path = tmp_path_factory.mktemp('pretrained') / 'mae_tiny'
  checkpoint.save_params(str(path), {'encoder': jax.device_get(params), 'decoder': {}},
                         dict(presets.model_config('tiny', **SMALL)))
  return str(path), jax.device_get(params)


@pytest.fixture(scope='module')
def finished_run(pretrained_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('seg') / 'run')
  config = run_config(init_from=pretrained_dir[0])
  result = seg_job.train_and_evaluate(config, workdir)
  return config, workdir, result


def _jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_run_logs_eval_and_eval_only_reproduces_it(finished_run, pretrained_dir):
  config, workdir, result = finished_run
  logged = [r for r in _jsonl(f'{workdir}/metrics.jsonl') if 'eval/miou' in r]
  assert [r['step'] for r in logged] == [4]
  assert logged[0]['eval/miou'] == result['miou'] and 0 <= result['miou'] <= 100
  assert logged[0]['eval/pixels'] == 8 * 32 * 32  # every pixel of every eval scene
  assert any('train/loss' in r and 'train/pixel_accuracy' in r for r in _jsonl(
      f'{workdir}/metrics.jsonl'))
  assert (epath.Path(workdir) / curves.CURVES_FILE).exists()  # drawn at the checkpoints
  params, _ = checkpoint.load_params(workdir)
  assert set(params) == {'encoder', 'pyramid', 'head'}
  moved = flat(params['encoder'])['blocks_0/mlp/fc1/kernel']
  start = flat(pretrained_dir[1])['blocks_0/mlp/fc1/kernel']
  assert 0 < np.abs(moved - start).max() < 0.05  # trained from the pretrained encoder
  config = config.copy_and_resolve_references()
  config.eval_only = True
  again = seg_job.train_and_evaluate(config, workdir)
  assert again['miou'] == result['miou'] and again['pixel_accuracy'] == result['pixel_accuracy']
  record = _jsonl(f'{workdir}/eval_only.jsonl')[-1]
  assert record['step'] == 4 and record['eval/miou'] == result['miou']


@pytest.mark.slow  # resumed in another parallelism mode: `pytest -m slow`
def test_resume_on_a_global_batch_reaches_the_uninterrupted_params(finished_run, tmp_path):
  """Steps 3-4 resumed from the step-2 checkpoint under jit over a device mesh ('data': the
  body sees the whole batch) reach the params of the uninterrupted pmap run (8 shards of one
  example each, sums psum'd): the loss is normalised by the global labelled-pixel count and
  drop path is keyed per example, so neither the resume nor the device split changes a step."""
  config, workdir, _ = finished_run
  batch = next(seg_data.create_dataset(config.dataset, split='train', mode='train',
                                       global_batch_size=8, image_size=32, seed=0, start_step=2))
  labelled = (batch['mask'] != 255).reshape(8, -1).sum(1)
  assert len(set(labelled.tolist())) > 1  # shards differ: a per-shard mean would not match
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(f'{resumed}/checkpoints/4')
  config = config.copy_and_resolve_references()
  config.parallelism = 'data'
  seg_job.train_and_evaluate(config, resumed)
  full, _ = checkpoint.load_params(f'{workdir}/checkpoints/4')
  part, _ = checkpoint.load_params(f'{resumed}/checkpoints/4')
  start, _ = checkpoint.load_params(f'{workdir}/checkpoints/2')
  for key, value in flat(full).items():
    assert not np.array_equal(flat(start)[key], value) or 'norm' in key, key  # steps moved it
    np.testing.assert_allclose(flat(part)[key], value, rtol=2e-5, atol=2e-6, err_msg=key)


def test_bad_inputs_fail_before_training(pretrained_dir, tmp_path):
  image, mask = scenes.scene(0, 'train', 32)
  root = str(tmp_path / 'data')
  write_folder(root, 'train', {'a': (image, mask), 'b': (image, mask[:31])})
  write_folder(root, 'val', {'c': (image, mask)})
  folder = dict(source='folder', data_dir=root, train_split='train', eval_split='val')
  workdir = tmp_path / 'bad'
  config = run_config(init_from=pretrained_dir[0])
  config.dataset.update(folder)
  with pytest.raises(ValueError, match='config.num_classes is not set'):
    seg_job.train_and_evaluate(config, str(workdir))
  config.num_classes = 6
  with pytest.raises(ValueError, match=r"Mask size \(31, 32\) differs .*images/train/b\.png"):
    seg_job.train_and_evaluate(config, str(workdir))
  with pytest.raises(ValueError, match='init_from'):
    seg_job.train_and_evaluate(run_config(), str(workdir))
  other = run_config(init_from=pretrained_dir[0])
  other.model = presets.model_config('tiny', **dict(SMALL, embed_dim=48))
  with pytest.raises(ValueError, match=r'encoder/\S+ has shape \(.*\) in .* but \(.*\) in the '
                                       r'config'):
    seg_job.train_and_evaluate(other, str(workdir))
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()
