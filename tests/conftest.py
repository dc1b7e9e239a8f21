"""Test setup: 8 simulated CPU devices (set before JAX is imported); temp files per test."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import tempfile  # noqa: E402  (after the environment above)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _library_temp_files_in_tmp_path(tmp_path, monkeypatch):
  """TFDS leaves an empty tempfile.mkdtemp() directory per dataset builder: keep them (and
  any other library's temporary files) in pytest's per-test directory, not in /tmp."""
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
