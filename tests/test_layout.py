"""The package's layering: each subpackage imports only the ones below it.

    model       <- nothing of mae_jax
    data        <- nothing of mae_jax (it knows nothing of the model)
    evaluators  <- nothing of mae_jax (functions of feature arrays: k-NN, logistic regression)
    io          <- model
    convert     <- model, io
    jobs        <- model, data, evaluators, io
    main.py  <- anything

Checked twice: by importing each subpackage alone in a new interpreter and reading
`sys.modules`, and by reading every import statement (also those inside functions,
which an import alone does not run).
"""
import ast
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

from child_env import child_env
import mae_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'mae_jax'
MAY_IMPORT = {
    'model': {'model'},
    'data': {'data'},
    # Evaluation of features (k-NN, logistic regression): arrays in, numbers out, so the
    # pretraining monitor, the extraction job and a user's notebook share it without
    # pulling in models, data or jobs.
    'evaluators': {'evaluators'},
    'io': {'io', 'model'},
    'convert': {'convert', 'model', 'io'},
    'jobs': {'jobs', 'model', 'data', 'evaluators', 'io'},
}
MAX_LINES = 500

_IMPORT_ALONE = r'''
import importlib, json, pkgutil, sys
package = importlib.import_module('mae_jax.' + sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
  if not info.name.endswith('.__main__'):
    importlib.import_module(info.name)
print(json.dumps(sorted({m.split('.')[1] for m in sys.modules
                         if m.startswith('mae_jax.') and m.count('.') >= 1})))
'''


def _subpackage(module: str) -> str:
  """'mae_jax.model.vit' -> 'model'; 'mae_jax.checkpoint' (an old path) -> its new package."""
  name = module.split('.')[1]
  if name in mae_jax.MOVED:
    return mae_jax.MOVED[name].split('.')[1]
  return name


def test_every_module_belongs_to_a_layer():
  top = sorted(p.name for p in PACKAGE.iterdir()
               if p.name != '__pycache__' and not p.name.startswith('.'))
  assert top == sorted(['__init__.py', 'main.py', *MAY_IMPORT]), (
      'mae_jax/ holds the subpackages and main.py only; put new modules in the subpackage '
      'of their layer (and add a new layer to MAY_IMPORT here).')


def test_each_subpackage_imported_alone_loads_only_the_layers_below():
  env = child_env(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  runs = {name: subprocess.Popen([sys.executable, '-c', _IMPORT_ALONE, name], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for name in MAY_IMPORT}
  problems = []
  for name, run in runs.items():
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, f'importing mae_jax.{name} alone failed:\n{err[-2000:]}'
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    if loaded - MAY_IMPORT[name]:
      extra = ', '.join(f'mae_jax.{n}' for n in sorted(loaded - MAY_IMPORT[name]))
      problems.append(f'importing mae_jax.{name} loads {extra}; it may use only '
                      f'{sorted(MAY_IMPORT[name])}')
  assert not problems, '\n'.join(problems)


def _mae_jax_imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      if node.module == 'mae_jax':
        yield node.lineno, [f'mae_jax.{a.name}' for a in node.names]
      elif node.module.startswith('mae_jax.'):
        yield node.lineno, [node.module]
    elif isinstance(node, ast.Import):
      yield node.lineno, [a.name for a in node.names if a.name.startswith('mae_jax.')]


def test_no_import_statement_crosses_a_layer_upwards():
  problems = []
  for name, allowed in MAY_IMPORT.items():
    for path in sorted((PACKAGE / name).rglob('*.py')):
      for line, modules in _mae_jax_imports(path):
        for module in modules:
          layer = _subpackage(module)
          if layer in mae_jax.MOVED or layer not in allowed:
            problems.append(f'{path.relative_to(REPO)}:{line} imports {module} ({layer}); '
                            f'mae_jax.{name} may import only {sorted(allowed)}')
  assert not problems, '\n'.join(problems)


def test_inside_the_package_modules_are_imported_by_their_new_paths():
  old = [f'{path.relative_to(REPO)}:{line} imports {module}'
         for path in sorted(PACKAGE.rglob('*.py'))
         for line, modules in _mae_jax_imports(path) for module in modules
         if module.split('.')[1] in mae_jax.MOVED]
  assert not old, 'Use the new module paths:\n' + '\n'.join(old)


def test_modules_stay_small():
  long = [f'{p.relative_to(REPO)}: {n} lines' for p in sorted(PACKAGE.rglob('*.py'))
          if (n := len(p.read_text().splitlines())) > MAX_LINES]
  assert not long, f'Split modules over {MAX_LINES} lines by concept: ' + ', '.join(long)


@pytest.mark.parametrize('old', sorted(mae_jax.MOVED))
def test_old_module_paths_are_the_new_modules(old):
  new = importlib.import_module(mae_jax.MOVED[old])
  assert getattr(mae_jax, old) is new
  assert importlib.import_module(f'mae_jax.{old}') is new
  assert new.__spec__.name == new.__name__ == mae_jax.MOVED[old]


def test_public_api():
  # pylint: disable=import-outside-toplevel
  from mae_jax import (Encoder, MaskedAutoencoder, mae_loss, normalize_patches, patchify,
                       random_masking, sincos_2d, unpatchify)
  from mae_jax.model import mae, vit
  assert MaskedAutoencoder is mae.MaskedAutoencoder and Encoder is vit.Encoder
  assert all(callable(f) for f in (mae_loss, normalize_patches, patchify, random_masking,
                                   sincos_2d, unpatchify))
  assert set(mae_jax.__all__) <= set(dir(mae_jax))
  with pytest.raises(AttributeError, match='no_such_name'):
    getattr(mae_jax, 'no_such_name')
