"""Test setup: 8 simulated CPU devices (set before JAX is imported), malloc kept as the jobs
keep it (mae_jax.jobs.host_memory); temp files per test."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import importlib.util  # noqa: E402  (after the environment above)
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from mae_jax.jobs import host_memory  # noqa: E402

# As `python -m mae_jax.main` does: XLA's per-step scratch memory is reused, not faulted in.
host_memory.keep_freed_memory()

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _library_temp_files_in_tmp_path(tmp_path, monkeypatch):
  """TFDS leaves an empty tempfile.mkdtemp() directory per dataset builder: keep them (and
  any other library's temporary files) in pytest's per-test directory, not in /tmp."""
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """configs/tiny.py run to the end, uninterrupted (6 steps on 8 devices, pmap); shared by
  the tests that compare other runs with it (read only)."""
  from mae_jax.jobs import pretrain  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('configs_tiny', REPO / 'configs' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = module.get_config()
  state = pretrain.train_and_evaluate(config, str(workdir))
  return dict(config=config, workdir=workdir, state=state)
