"""Faults a run survives, through `python -m mae_jax.main`: SIGTERM / SIGINT (save the step in
flight, exit 75, resume exactly), a truncated newest checkpoint (moved aside, resumed from
the one before), unreadable images (named, or replaced with bad_images='skip'), and the
SLURM launcher's requeue on exit status 75. The signal guard itself is tested in-process.
The four tests on the `preempted` runs (four processes, minutes on a shared 2-core machine)
are in the slow tier."""
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
from PIL import Image
import pytest

from child_env import child_env
from mae_jax.io import checkpoint
from mae_jax.jobs import preemption

REPO = pathlib.Path(__file__).resolve().parents[1]
# configs/tiny.py long enough to be interrupted, with no periodic checkpoint in the run.
TINY_400 = ('--config=configs/tiny.py', '--config.total_steps=400',
            '--config.checkpoint_every_steps=100000', '--config.log_every_steps=50',
            '--config.num_visualize=0')


def _env(cache=None):
  """One CPU device (not the 8 simulated ones of conftest): the runs are 2x faster. With
  `cache`, JAX's persistent compilation cache there: reruns load the step, not compile it."""
  env = child_env(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_compilation_cache')


def _start(workdir, log, cache, *args):
  return subprocess.Popen([sys.executable, '-m', 'mae_jax.main', f'--workdir={workdir}', *args],
                          cwd=REPO, env=_env(cache), stdout=open(log, 'w'),
                          stderr=subprocess.STDOUT)


def _wait_for(log, text, proc, timeout=600):
  deadline = time.time() + timeout
  while text not in pathlib.Path(log).read_text():
    assert proc.poll() is None, f'exited {proc.returncode} before {text!r}:\n' + log.read_text()
    assert time.time() < deadline, f'no {text!r} after {timeout} s'
    time.sleep(0.1)


def _steps_logged(workdir):
  import json  # pylint: disable=g-import-not-at-top
  return [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
          if '"loss"' in l]


def _truncate_params(step_dir):
  files = [f for f in (step_dir / 'params').rglob('*') if f.is_file() and f.parent.name == 'd']
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:10])


# --- Unreadable and unusual images ---------------------------------------------------------


def _encode(image, fmt, **kw):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kw)
  return buffer.getvalue()


def unusual_images(rng):
  """{file name: bytes} of valid images in unusual modes, as ImageNet's train set has them."""
  rgb = rng.integers(0, 256, (40, 36, 3), np.uint8)
  return {
      'gray.png': _encode(Image.fromarray(rgb[..., 0]), 'PNG'),
      'rgba.png': _encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), 'PNG'),
      'palette.png': _encode(Image.fromarray(rgb).convert('P'), 'PNG'),
      'deep16.png': _encode(Image.fromarray(rgb[..., 1].astype(np.uint16) * 257), 'PNG'),
      'cmyk.jpg': _encode(Image.fromarray(rgb).convert('CMYK'), 'JPEG'),
      'png_named.jpg': _encode(Image.fromarray(rgb), 'PNG'),
  }


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """An ImageFolder of 9 files: 2 unreadable (zero bytes, truncated JPEG), the rest valid."""
  root = tmp_path_factory.mktemp('bad_folder')
  rng = np.random.default_rng(5)
  files = dict(unusual_images(rng))
  good = _encode(Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)), 'JPEG')
  files.update({'empty.jpg': b'', 'truncated.jpg': good[:len(good) // 2], 'good.jpg': good})
  for i, (name, data) in enumerate(sorted(files.items())):
    folder = root / 'train' / ('a' if i % 2 else 'b')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
  return root


@pytest.fixture(scope='module')
def preempted(tmp_path_factory, cache, bad_folder):
  """Tiny runs on `bad_folder` with bad_images='skip': an uninterrupted one, one SIGTERMed
  after step 300, and the rerun of that one with a truncated newer checkpoint (step 400,
  copied from the uninterrupted run) in its way. Also a run with the default
  bad_images='error', which stops at its first batch."""
  root = tmp_path_factory.mktemp('preempted')
  work, ref = root / 'work', root / 'reference'
  folder = ('--config.dataset.source=imagefolder', f'--config.dataset.data_dir={bad_folder}',
            '--config.dataset.eval_split=train')
  args = TINY_400 + folder + ('--config.dataset.bad_images=skip',)
  # All three at once: the machine's second core is otherwise idle through their start-ups.
  error = _start(root / 'error', root / 'error.log', cache, *TINY_400, *folder)
  reference = _start(ref, root / 'reference.log', cache, *args)
  run = _start(work, root / 'work.log', cache, *args)
  _wait_for(root / 'work.log', 'step 300/400', run)
  sent = time.time()
  run.send_signal(signal.SIGTERM)
  status = run.wait(timeout=300)
  out = dict(status=status, seconds=time.time() - sent, log=(root / 'work.log').read_text(),
             steps_logged=_steps_logged(work), work=work, ref=ref,
             steps_saved=sorted(int(p.name) for p in (work / 'checkpoints').iterdir()),
             error_status=error.wait(timeout=600), error_log=(root / 'error.log').read_text(),
             error_workdir=root / 'error')
  assert reference.wait(timeout=600) == 0, (root / 'reference.log').read_text()[-3000:]
  out.update(reference_log=(root / 'reference.log').read_text())
  shutil.copytree(ref / 'checkpoints' / '400', work / 'checkpoints' / '400')
  _truncate_params(work / 'checkpoints' / '400')
  rerun = _start(work, root / 'rerun.log', cache, *args)
  out.update(rerun_status=rerun.wait(timeout=600), rerun_log=(root / 'rerun.log').read_text())
  return out


@pytest.mark.slow  # the `preempted` runs: `python -m pytest -m slow` (CI runs it)
def test_sigterm_saves_the_step_in_flight_and_exits_75(preempted):
  assert preempted['status'] == preemption.EXIT_PREEMPTED, preempted['log'][-3000:]
  assert preempted['seconds'] < 90
  [step] = preempted['steps_saved']  # the only checkpoint: checkpoint_every_steps > the run
  assert step >= max(preempted['steps_logged']) >= 300
  assert preempted['steps_logged'][-1] == step  # the saved step is logged too
  assert f'SIGTERM: saving step {step} and stopping' in preempted['log']
  assert (f'Stopped early on SIGTERM with the checkpoint of step {step} saved'
          in preempted['log'])


@pytest.mark.slow  # the `preempted` runs: `python -m pytest -m slow` (CI runs it)
def test_rerun_skips_a_truncated_newest_checkpoint_and_ends_like_an_uninterrupted_run(
    preempted):
  log, work = preempted['rerun_log'], preempted['work']
  assert preempted['rerun_status'] == 0, log[-3000:]
  [step] = preempted['steps_saved']
  assert 'Checkpoint step 400' in log and 'cannot be restored' in log
  assert f'Resumed from {work} at step {step}.' in log
  [moved] = [p for p in (work / 'checkpoints').iterdir() if p.name.startswith('400.corrupt-')]
  assert (moved / 'params' / 'manifest.ocdbt').exists()  # moved aside, not deleted
  resumed, _ = checkpoint.load_params(str(work))
  uninterrupted, _ = checkpoint.load_params(str(preempted['ref']))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  steps = _steps_logged(work)
  assert steps == sorted(set(steps)) and steps[-1] == 400 and step in steps


@pytest.mark.slow  # the `preempted` runs: `python -m pytest -m slow` (CI runs it)
def test_unreadable_image_stops_by_default_naming_it_before_training(preempted, bad_folder):
  status, log = preempted['error_status'], preempted['error_log']
  assert status == 1, log[-3000:]
  named = [f'{bad_folder}/train/{c}/{n}' for c in 'ab' for n in ('empty.jpg', 'truncated.jpg')]
  assert any(f"Cannot read image file '{path}'" in log for path in named), log[-3000:]
  assert "bad_images='skip'" in log  # the fix is named
  assert 'step 1/' not in log and 'Pretraining' not in log  # before the loop (and its compile)
  assert not (preempted['error_workdir'] / 'checkpoints').exists()


@pytest.mark.slow  # the `preempted` runs: `python -m pytest -m slow` (CI runs it)
def test_skip_replaces_unreadable_images_and_counts_them(preempted):
  """The uninterrupted run with bad_images='skip' (the preempted and resumed one ends with
  its params: the replacements do not depend on where a run started)."""
  log = preempted['reference_log']
  for name in ('empty.jpg', 'truncated.jpg'):
    assert f'Skipping image file ' in log and name in log
  for name in unusual_images(np.random.default_rng(0)):
    assert f'{name}\' of' not in log  # converted, never skipped
  import json  # pylint: disable=g-import-not-at-top
  records = [json.loads(l) for l in
             (preempted['ref'] / 'metrics.jsonl').read_text().splitlines()]
  last = [r for r in records if 'loss' in r][-1]
  assert last['step'] == 400 and last['bad_images_skipped'] >= 2 and np.isfinite(last['loss'])
  assert (preempted['ref'] / 'checkpoints' / '400' / 'commit_success.txt').exists()


# --- The signal guard in-process -----------------------------------------------------------


class _Manager:
  def __init__(self, preempt_at=None):
    self.preempt_at = preempt_at

  def reached_preemption(self, step):
    return step == self.preempt_at


def _handler(signum, frame):
  raise AssertionError('the previous handler ran')


def test_guard_stops_at_the_step_after_a_signal_and_restores_handlers():
  before = {s: signal.signal(s, _handler) for s in preemption.SIGNALS}
  try:
    with preemption.StopOnSignal(_Manager(), last_step=10) as stop:
      assert not stop.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(100):  # the Python handler runs between bytecodes
        pass
      # A second signal now gets the system default: it kills at once.
      assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
      assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
      assert stop.should_stop(2)
      assert preemption.last_stop() == {'step': 2, 'reason': 'SIGTERM'}
      assert not stop.should_stop(10)  # the last step: the run ends normally
    assert all(signal.getsignal(s) is _handler for s in preemption.SIGNALS)
    with pytest.raises(ZeroDivisionError):
      with preemption.StopOnSignal(_Manager(), last_step=10):
        assert signal.getsignal(signal.SIGTERM) is not _handler
        _ = 1 / 0
    assert all(signal.getsignal(s) is _handler for s in preemption.SIGNALS)
    assert preemption.last_stop() is None  # reset by each loop
    with preemption.StopOnSignal(_Manager(preempt_at=7), last_step=10) as stop:
      assert not stop.should_stop(6) and stop.should_stop(7)  # the multi-process sync point
      assert 'preemption notice' in preemption.last_stop()['reason']
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job: left ignored
    with preemption.StopOnSignal(_Manager(), last_step=10):
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    for s, h in before.items():
      signal.signal(s, h)


_CTRL_C = textwrap.dedent('''
    import os, signal, sys, time
    from mae_jax.jobs import preemption
    class M:
      def reached_preemption(self, step): return False
    with preemption.StopOnSignal(M(), last_step=10**9) as stop:
      os.kill(os.getpid(), signal.SIGINT)
      step = 0
      while not stop.should_stop(step): step += 1
      print('stopping cleanly', flush=True)
      if sys.argv[1] == 'twice':
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print('exited the loop', flush=True)
''')


@pytest.mark.parametrize('times', ['once', 'twice'])
def test_ctrl_c_once_stops_cleanly_and_twice_kills_at_once(times):
  start = time.time()
  result = subprocess.run([sys.executable, '-c', _CTRL_C, times], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert 'stopping cleanly' in result.stdout, result.stderr
  if times == 'once':
    assert result.returncode == 0 and 'exited the loop' in result.stdout
  else:
    assert result.returncode == -signal.SIGINT and 'exited the loop' not in result.stdout
    assert time.time() - start < 30  # not after the 30 s sleep


# --- The SLURM launcher's requeue --------------------------------------------------------------


@pytest.mark.parametrize('status,requeued,script_status', [(75, True, 0), (0, False, 0),
                                                           (1, False, 1)])
def test_slurm_script_requeues_on_exit_75_only(tmp_path, status, requeued, script_status):
  """launch/slurm_gpu.sbatch with stand-ins for srun, scontrol and python (no SLURM here)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in (('srun', 'exec "$@"'), ('scontrol', f'echo "$@" >> {tmp_path}/scontrol'),
                     ('python', f'echo "$@" > {tmp_path}/args; exit {status}')):
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\n{body}\n')
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242')
  result = subprocess.run(['bash', str(REPO / 'launch' / 'slurm_gpu.sbatch'), 'configs/vit_b.py',
                           '/shared/run', '--config.batch_size=8'], env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == script_status, result.stderr
  assert (tmp_path / 'args').read_text().split() == [
      '-m', 'mae_jax.main', '--config=configs/vit_b.py', '--workdir=/shared/run', '--multihost',
      '--config.batch_size=8']
  scontrol = tmp_path / 'scontrol'
  assert (scontrol.read_text() == 'requeue 4242\n') if requeued else not scontrol.exists()
