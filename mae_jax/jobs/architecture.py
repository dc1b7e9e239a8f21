"""The encoder architecture of a job that starts from a checkpoint: the checkpoint's, unless
the config sets it.

Downstream (linear probe, fine-tuning) and feature-extraction configs leave the
architecture fields of `config.model` (`recipes.ARCHITECTURE_FIELDS`: img_size, patch_size,
embed_dim, depth, num_heads, mlp_ratio, ...) as None placeholders. `resolve` fills each
None, in this order of precedence:

1. the config's own value (set in a config file or with `--config.model.embed_dim=...`);
2. the model config stored with the checkpoint the job starts from (`config.init_from`;
   for `eval_only`, `config.eval_from` or the workdir);
3. `config.default_model`, the recipe size's architecture, for a run without a checkpoint
   (`allow_random_init`) or a checkpoint that stores no model config.

A different `img_size` than the checkpoint's is a resolution change (the position table is
interpolated); a different patch size or width is caught by the shape check that names
the first mismatching parameter.
"""
from typing import Any, Dict, Optional

from absl import logging
import ml_collections

from mae_jax.io import checkpoint
from mae_jax.jobs.recipes import ARCHITECTURE_FIELDS


def checkpoint_source(config: ml_collections.ConfigDict, workdir: Optional[str] = None
                      ) -> Optional[str]:
  """The checkpoint whose stored model config a job's architecture comes from."""
  if config.get('eval_only'):
    return config.get('eval_from') or workdir
  return config.get('init_from') or None


def _stored_architecture(source: str) -> Optional[Dict[str, Any]]:
  model_config = checkpoint.load_model_config(source)
  if not model_config:
    return None
  return {k: model_config[k] for k in ARCHITECTURE_FIELDS if model_config.get(k) is not None}


def _normalise(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def resolve(config: ml_collections.ConfigDict, source: Optional[str]
            ) -> ml_collections.ConfigDict:
  """A copy of `config` whose `config.model` has every architecture field set.

  Args:
    config: a downstream or feature-extraction config (not modified).
    source: the checkpoint to read the stored model config from (only read when some
      field is None), or None.

  Raises:
    ValueError: naming the fields that neither the config, the checkpoint nor
      `config.default_model` gives, and how to set them.
  """
  model = config.model.to_dict()
  missing = [k for k in ARCHITECTURE_FIELDS if model.get(k) is None]
  if not missing:
    return config.copy_and_resolve_references()
  origin: Dict[str, str] = {}
  stored = _stored_architecture(source) if source else None
  default = config.get('default_model')
  default = default.to_dict() if default is not None else {}
  for key in missing:
    if stored and key in stored:
      model[key], origin[key] = _normalise(stored[key]), 'checkpoint'
    elif default.get(key) is not None:
      model[key], origin[key] = _normalise(default[key]), 'default_model'
  still = [k for k in missing if model.get(k) is None]
  if still:
    where = (f'the checkpoint {source} stores no model config' if source and stored is None
             else 'no checkpoint is given' if not source else
             f'the checkpoint {source} does not record them')
    raise ValueError(
        f'The encoder architecture is unknown: config.model.{", config.model.".join(still)} '
        f'unset and {where}. Set config.init_from to a pretraining workdir (or a converted '
        f'release), or set the fields, e.g. --config.model.{still[0]}=...')
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model = ml_collections.ConfigDict(model)
  _log(model, origin, source)
  return resolved


def _log(model: Dict[str, Any], origin: Dict[str, str], source: Optional[str]) -> None:
  def fields(where):
    return ', '.join(f'{k}={model[k]}' for k in ARCHITECTURE_FIELDS if origin.get(k) == where)
  parts = []
  if any(v == 'checkpoint' for v in origin.values()):
    parts.append(f'from {source}: {fields("checkpoint")}')
  if any(v == 'default_model' for v in origin.values()):
    parts.append(f'from config.default_model: {fields("default_model")}')
  given = ', '.join(f'{k}={model[k]}' for k in ARCHITECTURE_FIELDS if k not in origin)
  if given:
    parts.append(f'set in the config: {given}')
  logging.info('Encoder architecture %s.', '; '.join(parts))

