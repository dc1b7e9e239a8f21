"""Config files in Python: what `--config=path[:arg]` gives `python -m mae_jax.main`.

    config = mae_jax.load_config('configs/finetune.py:vit_l')  # = ('configs/finetune.py', 'vit_l')
    config.total_steps = 100                                    # as --config.total_steps=100
    mae_jax.jobs.finetune.train_and_evaluate(config, 'runs/ft_l')

A config file is a Python file with a `get_config()` function (taking one string
argument when the file accepts one, e.g. `get_config(arg='vit_b')`), as ml_collections'
`config_flags.DEFINE_config_file` reads it: the path may end in `:arg`, everything after
the first colon going to `get_config` unchanged. The config comes back locked, as the
flag gives it to the jobs: existing fields can be set, a misspelt new one raises
(`with config.unlocked():` adds fields on purpose). `tests/test_configs.py` checks that
this and the flag give the same config for every file in configs/.
"""
import importlib.util
import os
from typing import Optional, Tuple, Union

import ml_collections

PathLike = Union[str, 'os.PathLike[str]']


def split_spec(spec: PathLike) -> Tuple[str, Optional[str]]:
  """'configs/x.py:arg' -> ('configs/x.py', 'arg'); without a colon the arg is None."""
  path, colon, arg = os.fspath(spec).partition(':')
  return path, (arg if colon else None)


def load_config(path: PathLike, arg: Optional[str] = None, *,
                lock: bool = True) -> ml_collections.ConfigDict:
  """Loads a config file as `--config=path[:arg]` does.

  Args:
    path: the config file, e.g. 'configs/demo.py' (relative to the working directory), or
      'configs/finetune.py:vit_l' with the argument after the first colon.
    arg: the argument of `get_config(arg)`; give it here or after the colon, not both.
      None calls `get_config()` without one (the file's default).
    lock: lock the config (the flag's default): setting an unknown field then raises.

  Returns:
    What the file's `get_config` returns (a `ml_collections.ConfigDict`).

  Raises:
    FileNotFoundError: `path` is not a file.
    ValueError: an argument both in `path` and in `arg`, no `get_config` in the file, or
      `get_config` returned no ConfigDict.
  """
  file, spec_arg = split_spec(path)
  if spec_arg is not None and arg is not None:
    raise ValueError(f'load_config({os.fspath(path)!r}, {arg!r}): the argument is given twice; '
                     f'pass it after the colon or as `arg`, not both.')
  arg = spec_arg if arg is None else arg
  if not os.path.isfile(file):
    raise FileNotFoundError(f'Config file {file!r} not found (working directory {os.getcwd()!r}):'
                            f' give its path, e.g. configs/demo.py from the repository root.')
  name = 'mae_jax_config_' + os.path.splitext(os.path.basename(file))[0]
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ValueError(f'Config file {file!r} has no get_config() function.')
  config = get_config() if arg is None else get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'get_config() of {file!r} returned {type(config).__name__}, not a '
                     f'ml_collections.ConfigDict: end it with `return config`.')
  if lock:
    config.lock()
  return config
