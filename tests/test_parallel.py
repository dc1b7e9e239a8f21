"""config.parallelism: pmap, data and fsdp give the same runs; checkpoints resume in any layout.

On the 8 simulated CPU devices of conftest.py: the tiny pretraining run in each mode ends
with the same params, as do the downstream jobs; a run saved at step 3 on 8 devices
resumes on 4 devices in two processes (fsdp) and on 2 devices (pmap) and ends where the
uninterrupted run does; the FSDP layout of a ViT-H state holds 1/8 of it per device.
"""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from child_env import child_env
from mae_jax.io import checkpoint
from mae_jax.jobs import finetune, linear_probe, parallel, pretrain, recipes
from mae_jax.model import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
# Whole runs repeated in other layouts and process counts: the `slow` tier
# (`python -m pytest -m slow`; CI runs it after the default run).
SLOW = pytest.mark.slow
TOLERANCE = 3e-4  # max abs param difference allowed between modes (measured: ~3e-5)


def load_config(name):
  spec = importlib.util.spec_from_file_location(f'configs_{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def max_abs_diff(a, b):
  fa, fb = (traverse_util.flatten_dict(dict(t), sep='/') for t in (a, b))
  assert fa.keys() == fb.keys()
  return max(float(np.max(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])))) for k in fa)


def subprocess_env(devices):
  return child_env(JAX_PLATFORMS='cpu',
                   XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


# --- The FSDP rule ------------------------------------------------------------------------

def test_fsdp_rule_splits_the_largest_divisible_dimension():
  assert parallel.fsdp_spec((1024, 4096), 8) == P(None, 'batch')
  assert parallel.fsdp_spec((4096, 1024), 8) == P('batch')
  assert parallel.fsdp_spec((1024, 1024), 8) == P(None, 'batch')  # ties: the last dimension
  assert parallel.fsdp_spec((16, 16, 3, 1280), 8) == P(None, None, None, 'batch')
  assert parallel.fsdp_spec((1001, 999), 8) == P()  # nothing divides: replicated
  assert parallel.fsdp_spec((1280,), 8) == P()  # small: replicated
  assert parallel.fsdp_spec((2 ** 14,), 8) == P('batch')
  assert parallel.fsdp_spec((1024, 4096), 1) == P()


def test_fsdp_layout_of_a_vit_h_state_puts_an_eighth_on_each_device():
  """Abstract arrays only: the ViT-H state (params + AdamW moments) is 7.9 GB."""
  config = recipes.pretrain_config('vit_h')
  config.total_steps, config.warmup_steps = 10, 1
  state = pretrain.abstract_train_state(config, pretrain.create_model(config),
                                        pretrain.create_schedule(config, 10))
  layout = parallel.Layout('fsdp')
  shardings = layout.state_shardings(state)
  total = parallel.total_bytes(state)
  per_device = parallel.bytes_per_device(state, shardings)
  assert total > 7.5e9
  # Replicated are only leaves under FSDP_MIN_SIZE elements (biases, norms, tokens): < 1%.
  assert per_device <= total / 8 * 1.01, (per_device, total)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    if x.size >= parallel.FSDP_MIN_SIZE:
      assert s.spec != P(), x.shape
  assert parallel.bytes_per_device(state, parallel.Layout('data').state_shardings(state)) == total


# --- Pretraining: same params in every mode, resume in any layout ------------------------

@pytest.fixture(scope='module')
def runs(tiny_run, tmp_path_factory):
  """The tiny run (6 steps, batch 16, 8 devices) in pmap (conftest's) and data mode in this
  process, and in fsdp mode through `python -m mae_jax.main`."""
  out = {'pmap': dict(workdir=tiny_run['workdir'],
                      params=pretrain.unreplicate(tiny_run['state'].params))}
  workdir = tmp_path_factory.mktemp('data')
  config = load_config('tiny')
  config.parallelism = 'data'
  state = pretrain.train_and_evaluate(config, str(workdir))
  out['data'] = dict(workdir=workdir, params=parallel.Layout('data').host_state(state.params))
  workdir = tmp_path_factory.mktemp('fsdp')
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
       '--config.batch_size=16', '--config.total_steps=6', '--config.parallelism=fsdp'],
      cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out['fsdp'] = dict(workdir=workdir, params=checkpoint.load_params(str(workdir))[0])
  return out


@SLOW
def test_every_mode_ends_with_the_same_params(runs):
  base = runs['pmap']['params']
  np.testing.assert_equal(set(base), {'encoder', 'decoder'})
  for mode in ('data', 'fsdp'):
    assert max_abs_diff(runs[mode]['params'], base) <= TOLERANCE, mode
  # What a jit run saved is what it trained: the checkpoint holds the returned params.
  saved, _ = checkpoint.load_params(str(runs['data']['workdir']))
  assert max_abs_diff(saved, runs['data']['params']) == 0.0
  assert (runs['fsdp']['workdir'] / 'reconstructions' / 'step_0000006.png').exists()


def _interrupted_copy(workdir, tmp_path, name):
  copy = tmp_path / name
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / '6')
  assert sorted(p.name for p in (copy / 'checkpoints').iterdir()) == ['3']
  return copy


@SLOW
def test_fsdp_checkpoint_resumes_in_two_processes_on_four_devices(runs, tmp_path):
  """Saved sharded over 8 devices at step 3; resumed by two processes (jax.distributed,
  gloo) with 2 devices each, still fsdp: ends with the uninterrupted 8-device params."""
  workdir = _interrupted_copy(runs['fsdp']['workdir'], tmp_path, 'fsdp_on_4')
  env = subprocess_env(1)
  env.update(NUM_PROCESSES='2', DEVICES_PER_PROCESS='2', PORT=str(25000 + os.getpid() % 2000),
             PYTHON=sys.executable)
  result = subprocess.run(
      ['bash', str(REPO / 'launch' / 'local_cpu.sh'), 'configs/tiny.py', str(workdir),
       '--config.parallelism=fsdp'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from' in result.stderr and 'at step 3' in result.stderr
  resumed, _ = checkpoint.load_params(str(workdir))
  assert max_abs_diff(resumed, runs['pmap']['params']) <= TOLERANCE


@SLOW
def test_fsdp_checkpoint_resumes_under_pmap_on_two_devices(runs, tmp_path):
  workdir = _interrupted_copy(runs['fsdp']['workdir'], tmp_path, 'pmap_on_2')
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
       '--config.parallelism=pmap'],
      cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'at step 3' in result.stderr
  resumed, _ = checkpoint.load_params(str(workdir))
  assert max_abs_diff(resumed, runs['pmap']['params']) <= TOLERANCE


def test_bad_parallelism_and_batch_fail_before_compiling(tmp_path):
  config = load_config('tiny')
  config.parallelism = 'zero3'
  with pytest.raises(ValueError, match=r"config.parallelism='zero3' is not one of"):
    pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  config = load_config('tiny')
  config.parallelism, config.batch_size = 'fsdp', 12
  with pytest.raises(ValueError, match='batch_size=12 is not divisible by the number of devices'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'b'))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


# --- Downstream jobs ----------------------------------------------------------------------

def _downstream(job, mode, init_from, workdir):
  config = (recipes.linear_probe_config('demo') if job == 'linear_probe'
            else recipes.finetune_config('demo'))  # mixup/cutmix and drop path on
  config.model = presets.model_config('tiny')
  config.update(dict(total_steps=4, warmup_steps=1, batch_size=16, eval_batch_size=72,
                     log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=2,
                     async_checkpointing=False, init_from=init_from, parallelism=mode))
  run = linear_probe if job == 'linear_probe' else finetune
  result = run.train_and_evaluate(config, str(workdir))
  return checkpoint.load_params(str(workdir))[0], result


@SLOW
@pytest.mark.parametrize('job', ['linear_probe', 'finetune'])
def test_downstream_jobs_end_alike_under_pmap_and_fsdp(runs, job, tmp_path):
  """fsdp covers the jit path ('data' is the same program without sharded weights)."""
  init_from = str(runs['pmap']['workdir'])
  base, base_result = _downstream(job, 'pmap', init_from, tmp_path / 'pmap')
  for mode in ('fsdp',):
    params, result = _downstream(job, mode, init_from, tmp_path / mode)
    assert max_abs_diff(params, base) <= TOLERANCE, mode
    assert result['top1'] == base_result['top1'] and result['count'] == 72
    assert result['loss'] == pytest.approx(base_result['loss'], rel=1e-4)
