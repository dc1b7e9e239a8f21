"""Keeps freed host memory for reuse when JAX computes on the CPU (glibc's malloc).

XLA's CPU runtime allocates each step's temporary buffer, one block of tens of MB to a
few GB, when the step starts and frees it when it ends. glibc serves such a block with a
fresh `mmap` and returns it with `munmap`, so every step first-touches all of it again:
the kernel faults in and zeroes every page (the ViT-Ti benchmark step: 72,700 page faults
and 0.14 s of kernel time per step, about a third of the process's CPU time). With one
malloc arena, no `mmap` for large blocks and no trimming, the block stays in the heap and
the next step reuses it (3,700 faults per step; counted with `getrusage` around the steps).
The speed with and without it: `benchmarks/results/host_memory_cpu.jsonl` (README, Speed).

The trade: the process keeps its peak heap instead of giving freed memory back to the
system, and all threads share one arena (one lock; small allocations stay lock-free in
glibc's per-thread caches). That suits a training process on the CPU; on an accelerator
host, where XLA's step memory lives on the device, nothing is changed.

It must run before JAX creates its CPU client (the client's threads pick their malloc
arena on their first allocation): `mae_jax.main` calls it after parsing flags,
`tests/conftest.py` and the benchmarks before any JAX computation. Set
`MAE_JAX_KEEP_HOST_MEMORY=0` to leave malloc as it is.
"""
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
from typing import Optional

ENV_VAR = 'MAE_JAX_KEEP_HOST_MEMORY'

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Accelerator plugins JAX would pick over the CPU when no platform is named (besides those
# registered under the 'jax_plugins' entry point group).
_ACCELERATOR_MODULES = ('jax_plugins', 'libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin')

_applied = False


def _named_platforms() -> Optional[str]:
  """JAX's `jax_platforms` setting (flag, config or JAX_PLATFORMS), or None when unset."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    value = jax.config.jax_platforms
  except (ImportError, AttributeError):
    value = None
  return value or os.environ.get('JAX_PLATFORMS') or None


def _module_exists(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def _accelerator_plugins() -> list:
  """Names of the installed JAX accelerator plugins (entry points and known modules)."""
  found = [ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')]
  return found + [name for name in _ACCELERATOR_MODULES if _module_exists(name)]


def runs_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend.

  True when `jax_platforms` names 'cpu' first, or when it is unset and no accelerator
  plugin (TPU, CUDA, ROCm) is installed.
  """
  named = _named_platforms()
  if named is not None:
    return named.split(',')[0].strip() == 'cpu'
  return not _accelerator_plugins()


def _glibc() -> Optional[ctypes.CDLL]:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    libc.mallopt  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory(force: bool = False) -> bool:
  """Makes glibc's malloc keep and reuse freed blocks, if JAX will run on the CPU.

  Args:
    force: apply it whatever the platform (the setting is process-wide).

  Returns:
    Whether the setting is now in effect: False off glibc, on an accelerator (unless
    `force`), or with `MAE_JAX_KEEP_HOST_MEMORY=0`.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV_VAR, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return False
  if not (force or runs_on_cpu()):
    return False
  libc = _glibc()
  if libc is None:
    return False
  # Each call returns 1 on success; M_TRIM_THRESHOLD = -1 turns trimming off (mallopt(3)).
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
  _applied = ok
  return ok
