r"""Entry point of every job: `python -m mae_jax.main --config=CONFIG --workdir=DIR`.

Example: `python -m mae_jax.main --config=configs/demo.py --workdir=/tmp/mae_demo`.

`--config` is an ml_collections config file (with an optional `:arg` for configs that
take one, e.g. `configs/finetune.py:vit_b`); any field can be overridden on the command
line (`--config.batch_size=256`). `config.job` picks the job: 'pretrain',
'linear_probe', 'finetune', 'segmentation' or 'extract_features'. In Python,
`mae_jax.load_config('configs/finetune.py:vit_b')` gives the config this flag gives
(tests/test_configs.py compares them for every file). Rerunning the same command resumes
from the latest checkpoint in `--workdir`.

Multi-host: pass `--multihost` on every process. On TPU pods and under SLURM the
coordinator is found automatically; elsewhere give `--coordinator_address`,
`--num_processes` and `--process_id` (see launch/).

Exit status: 0 when the job finished; 75 (`preemption.EXIT_PREEMPTED`) when SIGTERM or
SIGINT stopped it early after saving a checkpoint (rerun the same command to resume; the
SLURM launcher requeues on it); anything else is an error.
"""
import importlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mae_jax.jobs import host_memory

JOBS = {
    'pretrain': 'mae_jax.jobs.pretrain',
    'linear_probe': 'mae_jax.jobs.linear_probe',
    'finetune': 'mae_jax.jobs.finetune',
    'segmentation': 'mae_jax.jobs.segmentation',
    'extract_features': 'mae_jax.jobs.extract_features',
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/demo.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and pictures.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() before anything else (one process '
    'per host; automatic on TPU pods and SLURM).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (with --multihost, when not on a TPU '
    'pod or SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (--multihost).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (--multihost).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Joins the multi-process run; CPU processes exchange collectives over gloo."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def parse_flags(argv):
  """absl's flag parsing; config_flags' error for an unknown `--config.x` becomes a usage error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = str(e.args[0] if e.args else e).strip('\'"').replace("\\'", "'").replace('\\n', ' ')
    sys.stderr.write(f'FATAL Flags parsing error: a --config.* override names a field the config '
                     f'does not have: {message}\nPass --helpfull to see every config field.\n')
    sys.exit(1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}: every option is a --flag.')
  # Before JAX starts its CPU client: each step's scratch memory is then reused, not faulted in.
  host_memory.keep_freed_memory()
  config = _CONFIG.value
  job = config.get('job')
  if job not in JOBS:
    raise app.UsageError(f'config.job={job!r} in {flags.FLAGS["config"].config_filename}; '
                         f'set it to one of {sorted(JOBS)}.')
  if _MULTIHOST.value:
    initialize_distributed()
  # The input pipelines use TensorFlow on the host only; keep it off any accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  logging.info('Config:\n%s', config)
  importlib.import_module(JOBS[job]).train_and_evaluate(config, _WORKDIR.value)
  from mae_jax.jobs import preemption  # pylint: disable=g-import-not-at-top
  stop = preemption.last_stop()
  if stop is not None:
    if jax.process_count() > 1:  # no process leaves before every one has saved
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('mae_jax_stopped_early')
    logging.warning('Stopped early on %s with the checkpoint of step %d saved in %s; exit status '
                    '%d: rerun the same command to resume.', stop['reason'], stop['step'],
                    _WORKDIR.value, preemption.EXIT_PREEMPTED)
    sys.exit(preemption.EXIT_PREEMPTED)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
