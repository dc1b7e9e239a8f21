"""Pretraining job: recipe, schedule and weight decay vs the reference, the pmapped step,
resume, refusal of incompatible workdirs, early errors, and the files a run leaves."""
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from child_env import child_env
import mae_jax
from mae_jax.data import pipeline
from mae_jax.io import checkpoint
from mae_jax.io import curves
from mae_jax.io import visualize
from mae_jax.jobs import optim
from mae_jax.jobs import pretrain
from mae_jax.jobs.recipes import pretrain_config
from mae_jax.model.mae import normalize_patches
from mae_jax.model.patches import patchify

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
  return mae_jax.load_config(REPO / 'configs' / f'{name}.py', lock=False)


def tree_allclose(a, b, **kw):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.allclose(x, y, **kw), a, b)))


# --- Recipe, schedule, weight decay -----------------------------------------------------


def reference_lr(epoch, lr, min_lr, warmup_epochs, epochs):
  """The reference's util/lr_sched.adjust_learning_rate (called per iteration, fractional epoch)."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_paper_recipe():
  config = pretrain_config('vit_b')
  opt = config.optimizer
  assert (opt.b1, opt.b2, opt.weight_decay, tuple(opt.no_decay_names)) == (0.9, 0.95, 0.05, ())
  assert (config.base_lr, config.batch_size, config.min_lr) == (1.5e-4, 4096, 0.0)
  assert (config.num_epochs, config.warmup_epochs) == (1600, 40)
  assert config.model.mask_ratio == 0.75 and config.model.norm_pix_loss
  assert (config.dataset.source, config.dataset.name) == ('tfds', 'imagenet2012')
  assert tuple(config.dataset.crop_scale) == (0.2, 1.0)
  assert optim.scaled_lr(config.base_lr, config.batch_size) == pytest.approx(2.4e-3)
  assert pretrain.schedule_steps(config, steps_per_epoch=312) == (1600 * 312, 40 * 312)
  assert pretrain_config('vit_l', num_epochs=800).num_epochs == 800


def test_schedule_matches_reference_per_iteration():
  steps_per_epoch, warmup_epochs, epochs, lr, min_lr = 7, 3, 11, 2.4e-3, 1e-6
  schedule = optim.warmup_cosine_schedule(lr, warmup_epochs * steps_per_epoch,
                                          epochs * steps_per_epoch, min_lr)
  steps = np.arange(epochs * steps_per_epoch + 1)
  ours = np.asarray(jax.vmap(schedule)(steps))
  ref = [reference_lr(s / steps_per_epoch, lr, min_lr, warmup_epochs, epochs) for s in steps]
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=lr * 1e-6)  # float32
  assert ours[0] == 0.0 and ours[warmup_epochs * steps_per_epoch] == pytest.approx(lr)


def test_weight_decay_mask_follows_timm_rule_of_the_reference():
  config = load_config('tiny')
  model = pretrain.create_model(config)
  rngs = {'params': jax.random.PRNGKey(0), 'mask': jax.random.PRNGKey(0)}
  params = jax.eval_shape(model.init, rngs, jnp.zeros((1, 32, 32, 3)))['params']
  flat = {'.'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  # timm's add_weight_decay with the empty skip list of main_pretrain.py, on torch-style names.
  reference = {n: not (len(x.shape) == 1 or n.endswith('.bias')) for n, x in flat.items()}
  mask = optim.weight_decay_mask(params, config.optimizer.no_decay_names)
  ours = {'.'.join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert ours == reference
  assert ours['encoder.cls_token'] and ours['decoder.mask_token']  # 3-D: decayed in pretraining
  assert not ours['encoder.norm.scale'] and not ours['encoder.blocks_0.attn.qkv.bias']
  assert ours['encoder.patch_embed.kernel'] and ours['decoder.pred.kernel']
  default = optim.weight_decay_mask(params)  # fine-tuning's list skips tokens and pos tables
  assert not jax.tree.leaves(default['encoder']['cls_token'])[0]
  assert not jax.tree.leaves(default['decoder']['mask_token'])[0]


def test_adamw_matches_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  params = {'fc': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=(3,))},
            'cls_token': rng.normal(size=(1, 1, 4)), 'norm': {'scale': rng.normal(size=(4,))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  schedule = optim.warmup_cosine_schedule(1e-2, 2, 6)
  tx = optim.adamw(schedule, params, weight_decay=0.05, b1=0.9, b2=0.95, no_decay_names=())
  opt_state = tx.init(params)
  names = ['fc.kernel', 'fc.bias', 'cls_token', 'norm.scale']
  get = {'fc.kernel': lambda t: t['fc']['kernel'], 'fc.bias': lambda t: t['fc']['bias'],
         'cls_token': lambda t: t['cls_token'], 'norm.scale': lambda t: t['norm']['scale']}
  tp = {n: torch.tensor(get[n](params), requires_grad=True) for n in names}
  decay = [tp[n] for n in names if not (tp[n].ndim == 1 or n.endswith('bias'))]
  no_decay = [tp[n] for n in names if tp[n].ndim == 1 or n.endswith('bias')]
  topt = torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.},
                            {'params': decay, 'weight_decay': 0.05}], lr=0.0, betas=(0.9, 0.95))
  for step in range(5):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for group in topt.param_groups:  # the reference sets the lr before every iteration
      group['lr'] = float(schedule(step))
    for n in names:
      tp[n].grad = torch.tensor(get[n](grads))
    topt.step()
  for n in names:
    np.testing.assert_allclose(get[n](params), tp[n].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_norm_pix_reconstruction_is_denormalised_per_patch():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  perfect = np.asarray(normalize_patches(patchify(images, 4)))  # the norm-pix target itself
  mask = np.ones((2, 16), np.float32)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  panels = visualize.reconstruction_panels(images, perfect, mask, 4, True, mean, std)
  np.testing.assert_allclose(panels['reconstruction'], panels['original'], atol=1e-5)
  raw = visualize.reconstruction_panels(images, perfect, mask, 4, False, mean, std)
  assert np.abs(raw['reconstruction'] - raw['original']).max() > 0.1
  grid = visualize.grid_image(panels)
  assert grid.dtype == np.uint8 and grid.shape[0] > 2 * 16 and grid.shape[1] > 4 * 16


# --- Runs of the job ---------------------------------------------------------------------


def read_jsonl(workdir):
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_run_writes_checkpoints_logs_pictures_and_learns(tiny_run):
  workdir = tiny_run['workdir']
  assert int(tiny_run['state'].step[0]) == 6
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [3, 6]
  params, model_config = checkpoint.load_params(str(workdir))
  assert model_config == tiny_run['config'].model.to_dict()
  assert tree_allclose(params, pretrain.unreplicate(tiny_run['state'].params), rtol=0, atol=0)
  assert list(workdir.glob('events.out.tfevents.*'))
  assert sorted(p.name for p in (workdir / 'reconstructions').iterdir()) == [
      'step_0000000.png', 'step_0000003.png', 'step_0000006.png']
  records = read_jsonl(workdir)
  train = [r for r in records if 'loss' in r]
  heldout = {r['step']: r['heldout_loss'] for r in records if 'heldout_loss' in r}
  assert [r['step'] for r in train] == [1, 2, 3, 4, 6]  # the first step, every 2nd, saves
  assert 'images_per_sec' not in train[0]  # the first step's time is mostly compiling
  assert all(r['images_per_sec'] > 0 and r['lr'] >= 0 for r in train[1:])
  # A few real steps lower the loss, on the training stream and on the fixed held-out batch.
  assert train[-1]['loss'] < train[0]['loss']
  assert heldout[6] < 0.95 * heldout[0], heldout
  # curves.png is drawn from metrics.jsonl: training and held-out loss, lr, grad_norm.
  assert (workdir / 'curves.png').stat().st_size > 0
  fig = curves.plot_curves(records)
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ['loss', 'lr', 'grad_norm']
  assert sorted(l.get_label() for l in fig.axes[0].lines) == ['heldout_loss', 'loss']


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
  workdir = tmp_path / 'resumed'
  config = load_config('tiny')
  # A preemption notice at step 4: the run saves that step and stops.
  monkeypatch.setattr(ocp.CheckpointManager, 'reached_preemption', lambda self, step: step == 4)
  state = pretrain.train_and_evaluate(config, str(workdir))
  assert int(state.step[0]) == 4
  assert checkpoint.check_workdir_compatible(str(workdir), config.model.to_dict()) == 4
  assert (workdir / 'curves.png').exists()  # drawn at the saves, not only at the end
  monkeypatch.undo()
  state = pretrain.train_and_evaluate(config, str(workdir))  # the same command again
  assert int(state.step[0]) == 6
  resumed, _ = checkpoint.load_params(str(workdir))
  uninterrupted, _ = checkpoint.load_params(str(tiny_run['workdir']))
  assert tree_allclose(resumed, uninterrupted, rtol=1e-6, atol=1e-7)
  steps = [r['step'] for r in read_jsonl(workdir) if 'loss' in r]
  assert steps == [1, 2, 3, 4, 5, 6]  # none logged twice (5: the resumed run's first step)
  heldout = [{r['step']: r['heldout_loss'] for r in read_jsonl(w) if 'heldout_loss' in r}
             for w in (workdir, tiny_run['workdir'])]
  assert heldout[0] == pytest.approx(heldout[1], rel=1e-5)  # steps 0, 3 and 6


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_run, tmp_path, monkeypatch):
  """A NaN in the images of step 5 (between the saves of steps 3 and 6): the run stops at
  the next check (step 6) naming step 5, and saves nothing after step 3."""
  create_dataset = pipeline.create_dataset

  def with_a_nan_batch(*args, **kwargs):
    stream = create_dataset(*args, **kwargs)
    if kwargs['mode'] != 'pretrain':
      return stream
    def batches():
      for step, batch in enumerate(stream, start=kwargs['start_step'] + 1):
        if step == 5:
          batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        yield batch
    return batches()

  monkeypatch.setattr(pretrain.pipeline, 'create_dataset', with_a_nan_batch)
  workdir = tmp_path / 'nan'
  with pytest.raises(FloatingPointError, match=r"Non-finite \{'loss': nan.*\} at step 5; "
                                               r'nothing after the last checkpoint \(step 3\)'):
    pretrain.train_and_evaluate(load_config('tiny'), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3']
  good, _ = checkpoint.load_params(str(workdir))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
  assert [r['step'] for r in read_jsonl(workdir) if 'loss' in r] == [1, 2, 3, 4]


def _listing(workdir):
  return sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob('*'))


def test_incompatible_config_never_touches_existing_workdir(tiny_run):
  workdir = tiny_run['workdir']
  before = _listing(workdir)
  config = load_config('tiny')
  config.model.embed_dim = 32
  with pytest.raises(checkpoint.CheckpointError, match=r'(?s)model.embed_dim: 64 -> 32.*--workdir'):
    pretrain.train_and_evaluate(config, str(workdir))
  assert _listing(workdir) == before


@pytest.fixture
def no_compiling(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('compiled before checking its input')
  monkeypatch.setattr(pretrain, 'training_functions', fail)
  monkeypatch.setattr(pretrain, 'create_train_state', fail)


def test_bad_input_fails_before_compiling(no_compiling, tmp_path):
  config = load_config('tiny')
  config.batch_size = 12
  with pytest.raises(ValueError, match=r'batch_size=12 is not divisible by the number of devices.*'
                                       r'--config.batch_size=8'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  config = load_config('tiny')
  config.dataset.source, config.dataset.data_dir = 'imagefolder', str(tmp_path / 'no_such_dir')
  with pytest.raises(FileNotFoundError, match='no_such_dir.*data_dir'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'b'))
  config = load_config('tiny')  # batch 16 on 8 devices: 2 per device
  config.grad_accum_steps = 4
  with pytest.raises(ValueError, match=r'grad_accum_steps=4 does not divide the per-device '
                                       r'batch 2.*divisor of 2'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  config.grad_accum_steps = 0
  with pytest.raises(ValueError, match=r'grad_accum_steps must be an integer >= 1'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  config = load_config('tiny')
  config.num_visualise = 4  # misspelt field in a config file
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['num_visualise'\]"):
    pretrain.train_and_evaluate(config, str(tmp_path / 'c'))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()


def test_main_rejects_unknown_config_key(tmp_path):
  workdir = tmp_path / 'w'
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.main', '--config=configs/tiny.py', '--config.batch_sise=8',
       f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 1
  assert 'FATAL Flags parsing error' in result.stderr
  assert 'Did you mean "batch_size" instead of "batch_sise"' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


# --- The step on devices ----------------------------------------------------------------


def _drop_key_bias(params):
  def drop(path, x):
    if path[-2].key == 'qkv' and path[-1].key == 'bias':
      d = x.shape[0] // 3
      return np.concatenate([x[:d], x[2 * d:]])
    return x
  return jax.tree_util.tree_map_with_path(drop, params)


def _step_setup(config):
  """(schedule, compiled functions, fresh state, batch stream) of the tiny run's config."""
  model = pretrain.create_model(config)
  schedule = pretrain.create_schedule(config, steps_per_epoch=0)
  fns = pretrain.training_functions(model, pretrain.optimizer_args(config), schedule)
  state = pretrain.create_train_state(config, model, jax.random.PRNGKey(0), schedule)
  stream = pipeline.create_dataset(
      config.dataset, split='train', mode='pretrain', global_batch_size=config.batch_size,
      image_size=32, seed=0)
  return schedule, fns, state, stream


@pytest.mark.slow  # the run on another device count: `pytest -m slow`
def test_pmap_over_8_devices_equals_one_device(tiny_run):
  assert jax.local_device_count() == 8
  schedule, fns, state, stream = _step_setup(tiny_run['config'])
  batches = [next(stream), next(stream)]  # step 0 has lr 0 (warmup), step 1 moves the params
  rng = jax.random.PRNGKey(3)
  eight = jax_utils.replicate(state, axis_name=pretrain.AXIS_NAME)
  one_device = jax.local_devices()[:1]
  one = jax_utils.replicate(state, devices=one_device, axis_name=pretrain.AXIS_NAME)
  p_one = pretrain.make_p_train_step(schedule, devices=one_device)
  for batch in batches:
    eight, m8 = fns.p_train_step(eight, pretrain.shard_batch(batch), rng)  # compiled by tiny_run
    one_batch = {'image': batch['image'][None], 'index': batch['index'][None].astype(np.int32)}
    one, m1 = p_one(one, one_batch, rng)
    assert np.allclose(m8['loss'], m1['loss'][0], rtol=1e-5)
    assert np.allclose(m8['grad_norm'], m1['grad_norm'][0], rtol=1e-4)
  p8, p1 = pretrain.unreplicate(eight.params), pretrain.unreplicate(one.params)
  # The key bias gets an exactly-zero gradient (softmax ignores a shift shared by all keys),
  # so Adam turns float round-off in it into +-lr steps on both sides: leave that third out.
  p8, p1 = _drop_key_bias(p8), _drop_key_bias(p1)
  assert tree_allclose(p8, p1, rtol=1e-5, atol=1e-6)
  # The step moved the parameters, so the comparison above is not vacuous.
  assert not tree_allclose(pretrain.unreplicate(one.params), state.params, atol=1e-6)


def test_gradient_accumulation_gives_the_same_step(tiny_run):
  """The whole batch on one device in 4 micro-batches equals the 8-device step: the same
  loss, gradient norm and parameters (masks are keyed per example, not per micro-batch)."""
  schedule, fns, state, stream = _step_setup(tiny_run['config'])
  rng = jax.random.PRNGKey(3)
  one_device = jax.local_devices()[:1]
  p_accum = pretrain.make_p_train_step(schedule, devices=one_device, accum_steps=4)
  eight = jax_utils.replicate(state, axis_name=pretrain.AXIS_NAME)
  accum = jax_utils.replicate(state, devices=one_device, axis_name=pretrain.AXIS_NAME)
  for _ in range(2):  # step 0 has lr 0 (warmup), step 1 moves the params
    batch = next(stream)
    eight, m8 = fns.p_train_step(eight, pretrain.shard_batch(batch), rng)
    one_batch = {'image': batch['image'][None], 'index': batch['index'][None].astype(np.int32)}
    accum, ma = p_accum(accum, one_batch, rng)
    np.testing.assert_allclose(ma['loss'][0], m8['loss'][0], rtol=1e-5)
    np.testing.assert_allclose(ma['grad_norm'][0], m8['grad_norm'][0], rtol=1e-4)
  pa, p8 = pretrain.unreplicate(accum.params), pretrain.unreplicate(eight.params)
  assert tree_allclose(_drop_key_bias(pa), _drop_key_bias(p8), rtol=1e-5, atol=1e-6)
  assert not tree_allclose(pa, state.params, atol=1e-6)


def test_pretraining_starts_from_a_converted_encoder_only_release(tiny_run, tmp_path):
  pytest.importorskip('torch', reason='writing a .pth release file needs torch (pip install .[test])')
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  config = load_config('tiny')
  params, model_config = checkpoint.load_params(str(tiny_run['workdir']))
  # A release whose encoder is far from anything this seed would draw.
  release = {'encoder': jax.tree.map(lambda x: np.asarray(x) + 0.5, params['encoder'])}
  pth = tmp_path / 'mae_pretrain_vit_tiny.pth'
  convert.export_pytorch_checkpoint(str(pth), release, model_config)
  converted = convert.load_pytorch_checkpoint(
      str(pth), num_heads=config.model.num_heads, decoder_num_heads=config.model.decoder_num_heads)
  checkpoint.save_params(str(tmp_path / 'release'), converted.params, converted.model_config)
  assert 'decoder' not in converted.params

  config.init_from = str(tmp_path / 'release')
  state = pretrain.train_and_evaluate(config, str(tmp_path / 'workdir'))
  trained = pretrain.unreplicate(state.params)
  # Six AdamW steps at lr <= 1e-3 move each weight by a few thousandths, not by 0.5.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       trained['encoder'], release['encoder'])
  assert max(jax.tree.leaves(moved)) < 0.02, moved
  assert set(trained) == {'encoder', 'decoder'}  # the decoder started from a fresh init

  config.init_from = str(tiny_run['workdir'] / 'nowhere')
  with pytest.raises(checkpoint.CheckpointError, match='nowhere'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'other'))


def _pid_of(*words):
  """The process whose command line holds all of `words` (Linux /proc)."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      cmdline = (pathlib.Path('/proc') / pid / 'cmdline').read_bytes().decode().split('\0')
    except OSError:
      continue
    if all(any(w in part for part in cmdline) for w in words):
      return int(pid)
  raise AssertionError(f'no process with {words}')


@pytest.mark.slow  # multi-process: `python -m pytest -m slow` (CI runs it)
def test_two_processes_train_exactly_like_one_also_when_one_is_preempted(tiny_run, tmp_path):
  """A real multi-host run: two processes on localhost joined by jax.distributed (gloo).

  Process 1 alone gets SIGTERM as it starts: JAX's preemption service tells process 0,
  both stop at the same step with a checkpoint and exit 75. The run is then finished here,
  in one process on 8 devices (the checkpoint does not depend on the process count)."""
  workdir = tmp_path / 'two_processes'
  env = child_env(NUM_PROCESSES='2', DEVICES_PER_PROCESS='1',
                  PORT=str(23000 + os.getpid() % 2000),
                  PYTHON=sys.executable)  # the interpreter running the tests, activated or not
  command = ['bash', str(REPO / 'launch' / 'local_cpu.sh'), 'configs/tiny.py', str(workdir),
             '--config.num_visualize=0']
  log1 = pathlib.Path(f'{workdir}.process1.log')
  run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (log1.exists() and 'JAX process 1/2' in log1.read_text()):
    assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
    time.sleep(0.1)
  os.kill(_pid_of('mae_jax.main', str(workdir), '--process_id=1'), signal.SIGTERM)
  out, _ = run.communicate(timeout=300)
  assert run.returncode == 75, out[-3000:]
  stops = [re.findall(r'saving step (\d+) and stopping', text) for text in (out, log1.read_text())]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops  # the same step on both
  assert [p.name for p in (workdir / 'checkpoints').iterdir()] == stops[0]
  assert int(stops[0][0]) < 6
  config = load_config('tiny')
  config.num_visualize = 0
  assert int(pretrain.train_and_evaluate(config, str(workdir)).step[0]) == 6
  two, _ = checkpoint.load_params(str(workdir))
  one, _ = checkpoint.load_params(str(tiny_run['workdir']))
  # Same batches, masks and updates on 2 devices in 2 processes as on 8 devices in one.
  assert tree_allclose(_drop_key_bias(two), _drop_key_bias(one), rtol=1e-4, atol=1e-5)
  losses = [{r['step']: r['loss'] for r in read_jsonl(w) if 'loss' in r}
            for w in (workdir, tiny_run['workdir'])]
  assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --- The online k-NN monitor -------------------------------------------------------------


def test_knn_monitor_logs_and_leaves_the_trajectory_alone(tiny_run, tmp_path):
  """With the monitor on every 3 steps, the params after 6 steps are bit-identical to the run
  without it, and knn_top1 lines land in metrics.jsonl at steps 0, 3 and 6."""
  import mae_jax  # pylint: disable=g-import-not-at-top
  from mae_jax.evaluators import knn  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'monitored'
  config = load_config('tiny')
  config.monitor.every_steps = 3
  state = pretrain.train_and_evaluate(config, str(workdir))
  monitored = pretrain.unreplicate(state.params)
  plain = pretrain.unreplicate(tiny_run['state'].params)
  for a, b in zip(jax.tree.leaves(monitored), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = read_jsonl(workdir)
  knn_lines = {r['step']: r for r in records if 'knn_top1' in r}
  assert sorted(knn_lines) == [0, 3, 6]
  assert all(r['knn_seconds'] > 0 and r['knn_top1'] == r['knn_top1_mean'] for r in
             knn_lines.values())
  losses = [[r['loss'] for r in read_jsonl(w) if 'loss' in r] for w in (workdir,
                                                                        tiny_run['workdir'])]
  assert losses[0] == losses[1]
  # The step-6 value is the k-NN of the final encoder on the embedded splits, all 8 photos
  # (k clamped to 8) against the 72 tiles.
  params, model_config = checkpoint.load_params(str(workdir))
  split = {}
  for name in ('train', 'test'):
    batch = next(iter(pipeline.create_dataset(config.dataset, split=name, mode='eval',
                                              global_batch_size=128, image_size=32, seed=0)))
    split[name] = (mae_jax.features(params, batch['image'][batch['valid']], model_config,
                                    pool='mean'), batch['label'][batch['valid']])
  expected = knn.knn_top1(*split['train'], *split['test'], k=8)
  assert knn_lines[6]['knn_top1'] == pytest.approx(expected)


def test_knn_monitor_bad_config_fails_before_compiling(no_compiling, tmp_path):
  for field, value, message in (('every_steps', -1, 'every_steps must be an integer >= 0'),
                                ('pool', 'max', "pool='max'"),
                                ('num_eval_examples', 0, 'num_eval_examples must be >= 1')):
    config = load_config('tiny')
    config.monitor[field] = value
    with pytest.raises(ValueError, match=message):
      pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  config = load_config('tiny')
  config.monitor.every_steps = 2
  config.monitor.eval_split = 'validation'  # the embedded set has train and test
  with pytest.raises(ValueError, match="not 'validation'"):
    pretrain.train_and_evaluate(config, str(tmp_path / 'a'))
  assert not (tmp_path / 'a').exists()
