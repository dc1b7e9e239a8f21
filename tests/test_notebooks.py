"""The quick-start notebook runs top to bottom (on the tiny config, a few steps)."""
import json
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'mae_quickstart.ipynb'


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  pytest.importorskip('IPython', reason='the notebook displays through IPython')
  root = NOTEBOOK.parents[1]
  monkeypatch.chdir(root)
  monkeypatch.setenv('MAE_NOTEBOOK_CONFIG', 'configs/tiny.py')
  monkeypatch.setenv('MAE_NOTEBOOK_STEPS', '4')
  monkeypatch.setenv('MAE_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  cells = json.loads(NOTEBOOK.read_text())['cells']
  # Shell lines (!pip install) are the reader's setup; the test environment has the package.
  source = '\n'.join(
      '\n'.join(line for line in ''.join(c['source']).splitlines() if not line.startswith(('!', '%')))
      for c in cells if c['cell_type'] == 'code')
  namespace = {}
  exec(compile(source, str(NOTEBOOK), 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['losses'] and namespace['pngs']
  assert namespace['state'] is not None
  panels = namespace['panels']
  assert set(panels) == {'original', 'masked', 'reconstruction', 'reconstruction + visible'}
  assert all(p.min() >= 0 and p.max() <= 1 for p in panels.values())
