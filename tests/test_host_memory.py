"""mae_jax.jobs.host_memory: on the CPU, XLA's per-call scratch memory is reused, not faulted in."""
import json
import os
import subprocess
import sys

import pytest

from mae_jax.jobs import host_memory

# A computation whose 64 MB intermediate (4096 x 4096 float32) lives in XLA's temporary
# buffer; the median of the page faults of 20 calls after the first two.
_SCRIPT = r"""
import json, resource, statistics
from mae_jax.jobs import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: (a @ b) @ a[:, :8])
a, b = jnp.ones((4096, 64)), jnp.ones((64, 4096))
faults = []
for _ in range(22):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'kept': kept, 'faults_per_call': statistics.median(faults[2:])}))
"""


def _faults_per_call(keep: str) -> dict:
  env = dict(os.environ, MAE_JAX_KEEP_HOST_MEMORY=keep, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None,  # pylint: disable=protected-access
                    reason='glibc malloc is absent: keep_freed_memory has nothing to set here')
def test_kept_memory_is_reused_instead_of_faulted_in_on_every_call():
  default = _faults_per_call('0')
  kept = _faults_per_call('1')
  assert default['kept'] is False and kept['kept'] is True
  # Without it every call faults the 64 MB block in again (16,384 pages of 4 KiB).
  assert default['faults_per_call'] > 8000, default
  assert kept['faults_per_call'] < default['faults_per_call'] / 4, (kept, default)


@pytest.mark.parametrize('platforms, plugin, expected', [
    ('cpu', None, True),
    ('cpu,cuda', None, True),
    ('cuda,cpu', None, False),
    ('tpu', None, False),
    (None, None, True),
    (None, 'libtpu', False),
    (None, 'jax_cuda12_plugin', False),
])
def test_runs_on_cpu_reads_the_platform_without_starting_a_backend(monkeypatch, platforms, plugin,
                                                                    expected):
  monkeypatch.setattr(host_memory, '_named_platforms', lambda: platforms)
  # Whatever this machine has installed: no entry points, and only `plugin` as a module.
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(host_memory, '_module_exists', lambda name: name == plugin)
  assert host_memory.runs_on_cpu() is expected


def test_nothing_is_set_on_an_accelerator_or_when_turned_off(monkeypatch):
  calls = []

  class FakeLibc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(host_memory, '_applied', False)
  monkeypatch.setattr(host_memory, '_glibc', FakeLibc)
  monkeypatch.setattr(host_memory, 'runs_on_cpu', lambda: False)
  assert host_memory.keep_freed_memory() is False and not calls
  monkeypatch.setenv(host_memory.ENV_VAR, '0')
  assert host_memory.keep_freed_memory(force=True) is False and not calls
  monkeypatch.setenv(host_memory.ENV_VAR, '1')
  assert host_memory.keep_freed_memory(force=True) is True
  assert calls == [(host_memory.M_ARENA_MAX, 1), (host_memory.M_MMAP_MAX, 0),
                   (host_memory.M_TRIM_THRESHOLD, -1)]
