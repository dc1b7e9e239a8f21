"""Every package the code imports is declared where a user installing mae_jax gets it.

A fresh `pip install -e .` brings exactly `install_requires` and what those packages
themselves require; `.[test]` adds the test extra. These tests read the imports of
`mae_jax/` and `tests/` (ast), and import the package for real in a new interpreter, and
check each third-party module against the requirements declared in `setup.cfg`, so a
missing dependency fails here instead of on a new user's machine.
"""
import ast
import configparser
import functools
import importlib.metadata as md
import json
import pathlib
import subprocess
import sys
from typing import Dict, Iterable, List, Set, Tuple

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from child_env import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = 'mae_jax'
# Third-party modules mae_jax may import only inside functions, with the extra that declares
# them: `import mae_jax` must work without them.
OPTIONAL_IMPORTS = {'torch': 'torch', 'safetensors': 'torch'}


def _requirements(text: str) -> List[Requirement]:
  return [Requirement(line.strip()) for line in text.splitlines()
          if line.strip() and not line.strip().startswith('#')]


@functools.lru_cache(maxsize=None)
def declared() -> Dict[str, Tuple[Requirement, ...]]:
  """setup.cfg's requirements: {'': install_requires, extra name: that extra's}."""
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  out = {'': tuple(_requirements(cfg.get('options', 'install_requires')))}
  for extra, text in cfg.items('options.extras_require'):
    out[extra] = tuple(_requirements(text))
  return out


def names(requirements: Iterable[Requirement]) -> Set[str]:
  return {canonicalize_name(r.name) for r in requirements}


@functools.lru_cache(maxsize=None)
def _module_distributions() -> Dict[str, Tuple[str, ...]]:
  return {m: tuple(canonicalize_name(d) for d in ds)
          for m, ds in md.packages_distributions().items()}


def distributions_of(module: str) -> Tuple[str, ...]:
  """The installed distributions that provide top-level `module` (several for namespaces)."""
  return _module_distributions().get(module, ())


def _import_nodes(root: pathlib.Path):
  """(file, node, inside a function) for every absolute third-party import under `root`."""
  for path in sorted(root.rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        modules = [node.module]
      else:
        continue
      tops = {m.split('.')[0] for m in modules} - set(sys.stdlib_module_names) - {
          PACKAGE, '__future__'}
      for top in sorted(tops):
        yield top, str(path.relative_to(REPO)), node, id(node) in lazy


def third_party_imports(root: pathlib.Path) -> Dict[str, List[Tuple[str, int, bool]]]:
  """{top-level module: [(file, line, inside a function)]} for every absolute import."""
  found: Dict[str, List[Tuple[str, int, bool]]] = {}
  for top, path, node, lazy in _import_nodes(root):
    found.setdefault(top, []).append((path, node.lineno, lazy))
  return found


def closure(requirements: Iterable[Requirement]) -> Set[str]:
  """Names of the installed distributions that `requirements` bring, transitively.

  Follows each installed distribution's own Requires-Dist, with the extras asked for
  and the markers of this interpreter.
  """
  seen: Set[str] = set()
  todo = [(r, frozenset(r.extras)) for r in requirements]
  while todo:
    req, extras = todo.pop()
    if req.marker is not None and not any(
        req.marker.evaluate({'extra': e}) for e in (extras or {''})):
      continue
    name = canonicalize_name(req.name)
    key = f'{name}[{",".join(sorted(req.extras))}]'
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = md.distribution(name)
    except md.PackageNotFoundError:
      continue  # not installed: imports of it fail on their own
    for line in dist.requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate({'extra': e})
                                   for e in set(req.extras) | {''}):
        todo.append((sub, frozenset(sub.extras)))
  return {k.split('[')[0] for k in seen}


def _where(places: List[Tuple[str, int, bool]]) -> str:
  return ', '.join(f'{f}:{line}' for f, line, _ in places[:3])


def test_every_import_of_the_package_is_declared():
  core = names(declared()[''])
  problems = []
  for module, places in sorted(third_party_imports(REPO / PACKAGE).items()):
    dists = distributions_of(module)
    if not dists:
      problems.append(f'{module} (imported at {_where(places)}) is not installed, so no '
                      f'requirement provides it: declare its distribution in setup.cfg')
      continue
    extra = OPTIONAL_IMPORTS.get(module)
    if extra is None:
      if not set(dists) & core:
        problems.append(f'{module} (imported at {_where(places)}) comes from {dists[0]}, which '
                        f'setup.cfg does not list in install_requires: add it there')
    else:
      if not set(dists) & names(declared()[extra]):
        problems.append(f'{module} (imported at {_where(places)}) comes from {dists[0]}, '
                        f'which the [{extra}] extra does not list: add it there')
      eager = [p for p in places if not p[2]]
      if eager:
        problems.append(f'{module} is optional ([{extra}]) but imported at module level at '
                        f'{_where(eager)}: import it inside the function that needs it')
  assert not problems, '\n'.join(problems)


def test_every_import_of_the_tests_is_declared_by_the_test_extra():
  available = names(declared()['']) | names(declared()['test'])
  # Modules of this repository that tests put on sys.path (tests/, benchmarks/).
  local = {p.stem for folder in ('tests', 'benchmarks') for p in (REPO / folder).glob('*.py')}
  problems = []
  for module, places in sorted(third_party_imports(REPO / 'tests').items()):
    if module in local:
      continue
    dists = distributions_of(module)
    if not set(dists) & available:
      problems.append(f'{module} (imported at {_where(places)}) comes from '
                      f'{dists[0] if dists else "no installed distribution"}: add it to the '
                      f'[test] extra in setup.cfg')
  assert not problems, '\n'.join(problems)


def test_installed_metadata_is_setup_cfg():
  """The environment was installed from this setup.cfg (else the other tests judge stale data)."""
  try:
    installed = md.requires(PACKAGE) or []
  except md.PackageNotFoundError:
    pytest.fail(f'{PACKAGE} is not installed: run pip install -e \'.[test]\'.')
  got = {(canonicalize_name(r.name), str(r.specifier)) for r in map(Requirement, installed)}
  want = {(canonicalize_name(r.name), str(r.specifier))
          for reqs in declared().values() for r in reqs}
  assert got == want, (
      f'The installed {PACKAGE} was not installed from this setup.cfg (only in setup.cfg: '
      f'{sorted(want - got)}; only installed: {sorted(got - want)}). Reinstall: '
      f'pip install -e \'.[test]\'.')


def test_the_test_extra_is_installed():
  """Tests that need torch, transformers or IPython skip without them; with `.[test]` installed
  nothing may skip for that reason, so an incomplete test environment fails here."""
  problems = []
  for req in declared()['test']:
    try:
      version = md.version(req.name)
    except md.PackageNotFoundError:
      problems.append(f'{req} is not installed')
      continue
    if not req.specifier.contains(version, prereleases=True):
      problems.append(f'{req} is required but {version} is installed')
  assert not problems, ('The [test] extra is not installed as declared: ' + '; '.join(problems) +
                        ". Run pip install -e '.[test]'.")


_IMPORT_EVERYTHING = r'''
import importlib, importlib.abc, json, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
  """What install_requires would not bring is not there, as on a fresh machine."""
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {blocked!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
    return None

sys.meta_path.insert(0, Block())
baseline = set(sys.modules)
import {package}
for info in pkgutil.walk_packages({package}.__path__, '{package}.'):
  if not info.name.endswith('.__main__'):
    importlib.import_module(info.name)
for statement in {lazy!r}:
  exec(statement)
print(json.dumps(sorted({{m.split('.')[0] for m in set(sys.modules) - baseline}})))
'''


def test_the_package_runs_with_only_what_install_requires_brings():
  """Imports every module and every lazily imported library in a new interpreter that cannot
  see what install_requires does not bring, directly or through its requirements.

  Catches what the ast cannot see: a library that imports a package it does not declare
  (clu's TensorBoard writer imports `tensorboard`). Libraries that merely use a package
  when present (tfds and IPython) are fine: blocked, they do without.
  """
  brought = closure(declared()[''])
  blocked = sorted(m for m, dists in _module_distributions().items()
                   if m != PACKAGE and not set(dists) & brought)
  lazy = sorted({ast.unparse(node) for top, _, node, is_lazy in _import_nodes(REPO / PACKAGE)
                 if is_lazy and top not in OPTIONAL_IMPORTS})
  code = _IMPORT_EVERYTHING.format(package=PACKAGE, lazy=lazy, blocked=set(blocked))
  env = child_env(drop=['PYTHONPATH'], JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False, env=env)
  if result.returncode:
    missing = [m for m in blocked if f"No module named '{m}" in result.stderr]
    hint = ''.join(f'\n{m} comes from {distributions_of(m)[0]}, which install_requires does '
                   f'not bring: declare it in setup.cfg.' for m in missing)
    pytest.fail(f'mae_jax fails to import with only its declared requirements:{hint}\n'
                f'{result.stderr[-2500:]}')
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert 'torch' not in loaded, 'import mae_jax must not import torch'
  imported_dists = {d for m in loaded for d in distributions_of(m)}
  unused = sorted(names(declared()['']) - imported_dists)
  assert not unused, (f'install_requires lists {unused}, which mae_jax never imports, directly '
                      f'or through a library: drop them.')
