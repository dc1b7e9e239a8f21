"""Fingerprint of the compiled pretraining step, to show that a change leaves the hot path alone.

Builds the pmapped train step exactly as the pretraining job does (model, AdamW, schedule,
replicated state, sharded batch) for a config file, compiles it, and prints the number of
instructions of the optimised HLO and a hash of its text with metadata (source lines, op
names) stripped, so moving code between files does not change it:

    python benchmarks/step_hlo.py --config configs/demo.py[:arg] [--dump step.hlo]

Two commits give the same hash when XLA compiles the same program for the step.
"""
import argparse
import hashlib
import json
import re


def optimised_hlo(config) -> str:
  """The compiled HLO text of the job's pmapped pretraining step for `config`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top

  model = pretrain.create_model(config)
  total = config.total_steps
  schedule = pretrain.create_schedule(config, steps_per_epoch=max(total, 1))
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  fns = pretrain.training_functions(model, pretrain.optimizer_args(config), schedule,
                                    config.grad_accum_steps)
  state = pretrain.create_train_state(config, model, init_rng, schedule)
  state = jax_utils.replicate(state, axis_name=pretrain.AXIS_NAME)
  size = pretrain.input_image_size(config)
  batch = pretrain.shard_batch({
      'image': np.zeros((config.batch_size, size, size, 3), np.float32),
      'index': np.arange(config.batch_size)})
  batch = next(jax_utils.prefetch_to_device(iter([batch]), 1, axis_name=pretrain.AXIS_NAME))
  return fns.p_train_step.lower(state, batch, train_rng).compile().as_text()


_DEBUG_TABLES = ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')


def strip_metadata(hlo: str) -> str:
  """HLO text without what names source files and Python functions: op metadata and the
  stack-frame tables (FileNames ... StackFrames) at the top of the module."""
  hlo = re.sub(r',?\s*metadata=\{[^}]*\}', '', hlo)
  hlo = re.sub(r'^HloModule \S+', 'HloModule m', hlo, flags=re.M)
  lines, in_table = [], False
  for line in hlo.splitlines():
    if line.strip() in _DEBUG_TABLES:
      in_table = True
      continue
    if in_table and re.match(r'\d+ ', line):
      continue
    in_table = False
    if line.strip():
      lines.append(line.rstrip())
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--dump', help='write the stripped HLO text here')
  args = parser.parse_args()
  import mae_jax  # pylint: disable=g-import-not-at-top
  text = strip_metadata(optimised_hlo(mae_jax.load_config(args.config, lock=False)))
  if args.dump:
    with open(args.dump, 'w') as f:
      f.write(text + '\n')
  instructions = sum(1 for line in text.splitlines() if ' = ' in line)
  print(json.dumps({'config': args.config, 'instructions': instructions,
                    'sha256': hashlib.sha256(text.encode()).hexdigest()}))


if __name__ == '__main__':
  main()
