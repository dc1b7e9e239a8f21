"""The speed benchmark runs the job's step and reports what it claims to (a short real run)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import bench_train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from child_env import child_env


def test_flop_count_of_vit_l_is_the_known_124_gflop_per_image():
  """ViT-L/16 MAE at 224 px, 75% masked, 8 x 512 decoder: ~41 GFLOP forward, x 3 to train."""
  dims = bench_train_step.model_dims('vit_l', [])
  assert bench_train_step.train_flops_per_image(dims) / 1e9 == pytest.approx(124.3, rel=0.01)
  baseline = bench_train_step.model_dims('vit_l', ['mask_token_in_encoder=True'])
  assert bench_train_step.train_flops_per_image(baseline) > 3 * 124e9


def _bench_env() -> dict:
  """The environment for running a benchmark script: CPU, no XLA flags of the test process."""
  return child_env(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))


@pytest.mark.slow  # a real benchmark run with the PyTorch yardstick: `pytest -m slow`
def test_benchmark_times_the_job_step_and_the_yardstick(tmp_path):
  out = tmp_path / 'r.jsonl'
  env = _bench_env()
  result = subprocess.run(
      [sys.executable, 'benchmarks/bench_train_step.py', '--model', 'tiny', '--batch', '16',
       '--steps', '1', '--warmup', '1', '--torch', '--cpu_devices', '2', '--vs_mask_tokens',
       '--json', str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  jax_row, baseline_row, torch_row, comparison = rows
  assert jax_row['framework'] == 'jax' and torch_row['framework'] == 'torch'
  assert not jax_row['mask_token_in_encoder'] and baseline_row['mask_token_in_encoder']
  assert baseline_row['framework'] == 'jax' and baseline_row['flops_per_image'] > 2.5 * jax_row[
      'flops_per_image']
  assert comparison['visible_only_step_s'] == jax_row['step_s']
  assert comparison['mask_tokens_step_s'] == baseline_row['step_s']
  assert comparison['speedup'] == baseline_row['step_s'] / jax_row['step_s']
  rows = [jax_row, baseline_row, torch_row]
  assert jax_row['devices'] == 2 and jax_row['parallelism'] == 'pmap'  # all local devices
  # --vs_mask_tokens alternates two models' steps: malloc is left as it is (see the script).
  assert jax_row['host_memory_kept'] is False
  for row in rows:
    assert row['step_s'] > 0 and row['images_per_s'] == 16 / row['step_s']
    assert row['achieved_flops_per_s'] == row['flops_per_image'] * row['images_per_s']
    assert 0 < row['mfu'] < 2 and row['peak_from'].startswith('float32')
  # The assumed (matmul) count and XLA's count of the compiled step agree to within the
  # elementwise work XLA adds.
  assert 1.0 <= jax_row['xla_flops_per_image'] / jax_row['flops_per_image'] < 1.5
  assert jax_row['compile_s'] > 0 and jax_row['compiled_bytes_per_device'] > 0
  assert np.isfinite(jax_row['loss']) and np.isfinite(torch_row['loss'])


def test_threads_pin_the_process_and_keep_the_other_xla_flags(tmp_path):
  """--threads limits JAX through the cores it may use; --cpu_devices still takes effect."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip('needs 2 allowed cores to show that --threads 1 pins to one')
  out = tmp_path / 'r.jsonl'
  env = _bench_env()
  args = [sys.executable, 'benchmarks/bench_train_step.py', '--model', 'tiny', '--batch', '4',
          '--steps', '1', '--warmup', '0', '--cpu_devices', '2', '--json', str(out)]
  result = subprocess.run(args + ['--threads', '1'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(out.read_text())
  assert row['devices'] == 2 and row['threads'] == 1
  assert row['cpus'] == sorted(os.sched_getaffinity(0))[:1]
  too_many = len(os.sched_getaffinity(0)) + 1
  result = subprocess.run(args + ['--threads', str(too_many)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode != 0 and f'--threads {too_many}' in result.stderr


def _row(framework, speed, started, **kw):
  row = dict(model='vit_s', overrides=['dtype=float32'], batch=8, dtype='float32', threads=2,
             cpu_devices=None, host_memory_kept=True, mask_token_in_encoder=False,
             started=started, host_cpu='CPU X, 2 cores', framework=framework, images_per_s=speed,
             peak_flops_per_s=3e11)
  row.update({'jax': '0.10.2'} if framework == 'jax' else {'torch': '2.13.0'})
  row.update(kw)
  return row


def test_speed_table_has_one_line_per_run_with_the_ratio_of_medians():
  import speed_table  # pylint: disable=g-import-not-at-top
  first = [_row('jax', 5.0, 't1'), _row('torch', 4.0, 't1'), _row('jax', 6.0, 't1'),
           _row('torch', 3.0, 't1'), _row('jax', 7.0, 't1'), _row('torch', 3.5, 't1')]
  second = [_row('jax', 2.0, 't2', host_memory_kept=False), _row('torch', 4.0, 't2',
                                                                 host_memory_kept=False)]
  comparison = dict(model='vit_s', comparison='visible-only', speedup=3.0)
  groups = speed_table.runs(first + [comparison] + second)
  assert [len(g) for g in groups] == [6, 2]
  summary = speed_table.summarize(groups[0])
  assert summary['speeds'] == {'jax': [5.0, 6.0, 7.0], 'torch': [4.0, 3.0, 3.5]}
  assert summary['ratio'] == pytest.approx(6.0 / 3.5)
  lines = speed_table.markdown(groups).splitlines()
  assert len(lines) == 4
  assert '| vit_s | 8 | 2 | yes | 5 / 6 / 7 | 4 / 3 / 3.5 | 1.71x |' in lines[2]
  assert 'jax 0.10.2, torch 2.13.0' in lines[2] and 'CPU X, 2 cores' in lines[2]
  assert '| no | 2 | 4 | 0.50x |' in lines[3]


def test_speed_table_reads_the_committed_cpu_results():
  import speed_table  # pylint: disable=g-import-not-at-top
  groups = speed_table.runs(speed_table.read(
      [REPO / 'benchmarks' / 'results' / 'cpu_vs_torch_2threads.jsonl']))
  summaries = [speed_table.summarize(g) for g in groups]
  assert summaries and all(s['ratio'] is not None and s['ratio'] > 0 for s in summaries)
  # Every run alternated the frameworks: as many repeats of one as of the other.
  assert all(len(s['speeds']['jax']) == len(s['speeds']['torch']) for s in summaries)


def test_matmul_rates_time_both_frameworks_and_refuse_bad_shapes(tmp_path):
  """benchmarks/matmul_rates.py: one line per shape, dtype and framework, rate = 2mkn / time."""
  out = tmp_path / 'm.jsonl'
  args = [sys.executable, 'benchmarks/matmul_rates.py', '--threads', '1', '--seconds', '0',
          '--shapes', '64x32x16,8x8x8', '--json', str(out)]
  result = subprocess.run(args, cwd=REPO, env=_bench_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['framework'], r['m'], r['dtype']) for r in rows] == [
      (f, m, d) for m in (64, 8) for d in ('float32', 'bfloat16') for f in ('jax', 'torch')]
  for row in rows:
    assert row['seconds'] > 0 and row['cpus'] == sorted(os.sched_getaffinity(0))[:1]
    flops = 2 * row['m'] * row['k'] * row['n']
    assert row['gflops_per_s'] == pytest.approx(flops / row['seconds'] / 1e9)
  bad = subprocess.run(args[:-2] + ['--shapes', '64x32'], cwd=REPO, env=_bench_env(),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--shapes '64x32'" in bad.stderr
