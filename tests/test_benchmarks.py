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


def test_flop_count_of_vit_l_is_the_known_124_gflop_per_image():
  """ViT-L/16 MAE at 224 px, 75% masked, 8 x 512 decoder: ~41 GFLOP forward, x 3 to train."""
  dims = bench_train_step.model_dims('vit_l', [])
  assert bench_train_step.train_flops_per_image(dims) / 1e9 == pytest.approx(124.3, rel=0.01)
  baseline = bench_train_step.model_dims('vit_l', ['mask_token_in_encoder=True'])
  assert bench_train_step.train_flops_per_image(baseline) > 3 * 124e9


@pytest.mark.slow  # a real benchmark run with the PyTorch yardstick: `pytest -m slow`
def test_benchmark_times_the_job_step_and_the_yardstick(tmp_path):
  out = tmp_path / 'r.jsonl'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
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
  for row in rows:
    assert row['step_s'] > 0 and row['images_per_s'] == 16 / row['step_s']
    assert row['achieved_flops_per_s'] == row['flops_per_image'] * row['images_per_s']
    assert 0 < row['mfu'] < 2 and row['peak_from'].startswith('float32')
  # The assumed (matmul) count and XLA's count of the compiled step agree to within the
  # elementwise work XLA adds.
  assert 1.0 <= jax_row['xla_flops_per_image'] / jax_row['flops_per_image'] < 1.5
  assert jax_row['compile_s'] > 0 and jax_row['compiled_bytes_per_device'] > 0
  assert np.isfinite(jax_row['loss']) and np.isfinite(torch_row['loss'])
