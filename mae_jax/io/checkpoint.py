"""Checkpoints: params-only files for sharing, and resumable training checkpoints in a workdir.

One on-disk layout serves both. A checkpoint directory holds two orbax items:

    <dir>/params/   the parameter tree (NumPy arrays), e.g. {'encoder': ..., 'decoder': ...}
    <dir>/meta/     JSON: {'format', 'model_config', 'step', 'config'}

`save_params` writes such a directory (a converted PyTorch release is stored this way).
A pretraining workdir keeps one per saved step under `<workdir>/checkpoints/<step>/`,
managed by an orbax `CheckpointManager`, with a third item `opt_state`. `load_params`
accepts any of the three: a workdir, one step directory, or a `save_params` directory.

The model config stored in `meta` is compared with the config of a run that wants to
resume a workdir (`check_workdir_compatible`), so an existing workdir is never
overwritten by a run whose parameters would not match.
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = 'mae_jax'
CHECKPOINT_SUBDIR = 'checkpoints'
PARAMS_ITEM = 'params'
OPT_STATE_ITEM = 'opt_state'
META_ITEM = 'meta'

PyTree = Any


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the run that wants it."""


def _path(path: Any) -> epath.Path:
  """`path` as orbax needs it: local paths absolute (orbax refuses relative ones while it
  saves), cloud paths (gs://...) as they are."""
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _json_normalise(tree: Any) -> Any:
  """Round-trips through JSON so tuples become lists, as they come back from disk."""
  return json.loads(json.dumps(tree))


def _to_numpy(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _for_orbax(tree: PyTree) -> PyTree:
  """Arrays spread over several devices (a jit run's global arrays) go to orbax as they are,
  so each process writes only its own shards; everything else is copied to host NumPy
  first (training then goes on while the files are written)."""
  def convert(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      return x
    return np.asarray(jax.device_get(x))
  return jax.tree.map(convert, tree)


def _restore_template(tree: PyTree) -> PyTree:
  """Abstract arrays with a sharding restore onto it; anything else restores as NumPy."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x),
                      tree)


def _composite_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(directory: str, params: PyTree, model_config: Optional[Mapping[str, Any]],
                step: Optional[int] = None, config: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a params-only checkpoint to `directory` (which must not exist yet).

  Args:
    directory: where to write; the checkpoint's own folder.
    params: the parameter tree (e.g. `{'encoder': ..., 'decoder': ...}` or encoder only).
    model_config: the `config.model` dict the params belong to (`MaskedAutoencoder(**it)`).
    step: optional training step the params come from.
    config: optional full experiment config, kept for the record.
  """
  directory = _path(directory)
  if directory.exists():
    raise CheckpointError(f'{directory} already exists; save_params never overwrites. '
                          f'Choose a new directory or delete the old one first.')
  meta = _meta(model_config, step, config)
  _composite_checkpointer().save(
      directory, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardSave(_to_numpy(params)),
          META_ITEM: ocp.args.JsonSave(meta)}))


def _meta(model_config, step, config) -> Dict[str, Any]:
  return {
      'format': FORMAT,
      'model_config': None if model_config is None else _json_normalise(dict(model_config)),
      'step': None if step is None else int(step),
      'config': None if config is None else _json_normalise(dict(config)),
  }


def _step_dirs(directory: epath.Path) -> List[Tuple[int, epath.Path]]:
  """Finished step directories (`<int>/` holding a params item), ascending."""
  if not directory.is_dir():
    return []
  steps = []
  for child in directory.iterdir():
    if child.name.isdigit() and (child / PARAMS_ITEM).exists():
      steps.append((int(child.name), child))
  return sorted(steps)


def resolve_checkpoint(path: str) -> epath.Path:
  """The checkpoint directory (holding `params/`) that `path` designates.

  `path` may be a checkpoint directory itself, a pretraining workdir (its latest step)
  or a workdir's `checkpoints/` folder (its latest step).
  """
  path = _path(path)
  if not path.exists():
    raise CheckpointError(f'No checkpoint at {path}: the path does not exist. Pass a '
                          f'pretraining workdir, one of its checkpoints/<step> folders, or a '
                          f'directory written by checkpoint.save_params.')
  if (path / PARAMS_ITEM).exists():
    return path
  for folder in (path / CHECKPOINT_SUBDIR, path):
    steps = _step_dirs(folder)
    if steps:
      return steps[-1][1]
  raise CheckpointError(f'{path} holds no mae_jax checkpoint (no params/ item and no '
                        f'checkpoints/<step>/ folders). Pass a pretraining workdir, one of its '
                        f'checkpoints/<step> folders, or a directory written by save_params.')


def _restore_item(checkpoint_dir: epath.Path, item: str, args: ocp.args.CheckpointArgs) -> Any:
  """One item of a checkpoint directory; damaged files become a CheckpointError with the fix."""
  try:
    restored = _composite_checkpointer().restore(
        checkpoint_dir, args=ocp.args.Composite(**{item: args}))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f'The {item} of the checkpoint at {checkpoint_dir} cannot be read '
                          f'({type(e).__name__}: {e}); the checkpoint is corrupt or incomplete. '
                          f'Use another step or re-create it.') from e
  return restored[item]


def _host_template(checkpoint_dir: epath.Path, item: str) -> Any:
  """A NumPy target for `item` from its stored shapes and dtypes, so that arrays saved sharded
  over another run's devices restore on this host whatever its devices (np.empty: no memory
  is touched before orbax fills it). None when the item records no array metadata."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(checkpoint_dir / item)
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
  except Exception:  # pylint: disable=broad-except  (older layouts: restore without a target)
    return None


def read_meta(checkpoint_dir: epath.Path) -> Optional[Dict[str, Any]]:
  """The JSON `meta` item of a checkpoint directory, or None if it has none."""
  if not (checkpoint_dir / META_ITEM).exists():
    return None
  return _restore_item(checkpoint_dir, META_ITEM, ocp.args.JsonRestore())


def load_params(path: str) -> Tuple[PyTree, Optional[Dict[str, Any]]]:
  """Loads `(params, model_config)` from a workdir, a step directory or a save_params directory.

  Params come back as NumPy arrays. `model_config` is the stored `config.model` dict,
  or None when the checkpoint does not record one. Raises `CheckpointError` with the
  fix when the path is missing or the checkpoint cannot be read.
  """
  checkpoint_dir = resolve_checkpoint(path)
  meta = read_meta(checkpoint_dir)
  params = _restore_item(checkpoint_dir, PARAMS_ITEM,
                         ocp.args.StandardRestore(_host_template(checkpoint_dir, PARAMS_ITEM)))
  model_config = None if meta is None else meta.get('model_config')
  return _to_numpy(params), model_config


def load_model_config(path: str) -> Optional[Dict[str, Any]]:
  """The stored `config.model` of the checkpoint `path` designates (as `load_params`), or
  None when it records none; reads the small `meta` item only, not the params."""
  meta = read_meta(resolve_checkpoint(path))
  return None if meta is None else meta.get('model_config')


def load_step(path: str) -> Optional[int]:
  """The training step the checkpoint `path` designates was saved at (None if unrecorded)."""
  meta = read_meta(resolve_checkpoint(path))
  return None if meta is None else meta.get('step')


# ---------------------------------------------------------------------------------------
# Training checkpoints in a workdir.


def config_differences(old: Any, new: Any, prefix: str = '') -> List[str]:
  """Human-readable `field: old -> new` lines for two JSON-like trees."""
  old, new = _json_normalise(old), _json_normalise(new)
  if isinstance(old, dict) and isinstance(new, dict):
    lines = []
    for key in sorted(set(old) | set(new)):
      name = f'{prefix}.{key}' if prefix else key
      if key not in old:
        lines.append(f'{name}: (absent) -> {new[key]!r}')
      elif key not in new:
        lines.append(f'{name}: {old[key]!r} -> (absent)')
      else:
        lines.extend(config_differences(old[key], new[key], name))
    return lines
  return [] if old == new else [f'{prefix}: {old!r} -> {new!r}']


def check_workdir_compatible(workdir: str, model_config: Mapping[str, Any],
                             config: Optional[Mapping[str, Any]] = None) -> Optional[int]:
  """Checks that `workdir`'s checkpoints were made with the same model; returns their latest step.

  Returns None for a workdir without checkpoints. Raises `CheckpointError` naming the
  differing fields when the stored model config differs from `model_config`, so that a
  run never writes over checkpoints of another model. Differences elsewhere in the
  config (batch size, learning rate, ...) are allowed and logged as warnings.
  """
  steps = _step_dirs(_path(workdir) / CHECKPOINT_SUBDIR)
  if not steps:
    return None
  step, latest = steps[-1]
  meta = read_meta(latest)
  if meta is None or meta.get('format') != FORMAT or meta.get('model_config') is None:
    raise CheckpointError(
        f'{latest} is not a mae_jax training checkpoint (no model config recorded). Refusing to '
        f'write into {workdir}: pass a new --workdir.')
  diffs = config_differences(meta['model_config'], dict(model_config), 'model')
  if diffs:
    raise CheckpointError(
        f'The checkpoints in {workdir} (latest step {step}) were made with a different model '
        f'config:\n  ' + '\n  '.join(diffs) +
        '\nResuming would not fit their parameters, and a new run would overwrite them. Pass '
        'a new --workdir for this config, or restore the old values to resume.')
  if config is not None and meta.get('config') is not None:
    other = [d for d in config_differences(meta['config'], dict(config))
             if not d.startswith('model.')]
    if other:
      logging.warning('Resuming %s with config changes since step %d:\n  %s', workdir, step,
                      '\n  '.join(other))
  return step


def create_manager(workdir: str, max_to_keep: Optional[int] = 3,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """An orbax `CheckpointManager` over `<workdir>/checkpoints` keeping the last `max_to_keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_path(workdir) / CHECKPOINT_SUBDIR, options=options)


def save_train_checkpoint(manager: ocp.CheckpointManager, step: int, params: PyTree,
                          opt_state: PyTree, model_config: Mapping[str, Any],
                          config: Optional[Mapping[str, Any]] = None) -> None:
  """Saves params, optimizer state and meta for `step` (asynchronously if the manager is async).

  Host and single-device arrays are copied to host NumPy first, so training can go on while
  files are written; arrays sharded over devices are written shard by shard by orbax.
  """
  manager.save(step, args=ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(_for_orbax(params)),
      OPT_STATE_ITEM: ocp.args.StandardSave(_for_orbax(opt_state)),
      META_ITEM: ocp.args.JsonSave(_meta(model_config, step, config))}))


def restore_train_checkpoint(manager: ocp.CheckpointManager, step: int, params: PyTree,
                             opt_state: PyTree) -> Tuple[PyTree, PyTree]:
  """Restores `(params, opt_state)` of `step`, shaped like the given templates.

  Array templates give NumPy arrays; `jax.ShapeDtypeStruct`s with a sharding give arrays laid
  out on it, whatever the layout (device count, parallelism) of the run that saved them.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardRestore(_restore_template(params)),
        OPT_STATE_ITEM: ocp.args.StandardRestore(_restore_template(opt_state))}))
  except Exception as e:  # orbax raises many types for damaged or mismatched files
    raise CheckpointError(
        f'Cannot restore step {step} from {manager.directory} ({type(e).__name__}: {e}). The '
        f'checkpoint is corrupt or was written by an incompatible version; delete that step '
        f'folder to resume from an earlier one, or pass a new --workdir.') from e
  return restored[PARAMS_ITEM], restored[OPT_STATE_ITEM]
