"""Per-device memory of the pretraining step for each model size and `config.parallelism`.

Nothing is allocated at full size. Per device it prints:
- params and AdamW state: exact, from the state's shapes and the mode's shardings;
- activations: the residuals the forward pass saves for the backward pass at the
  per-device batch (jax's `print_saved_residuals` of the loss, arguments excluded), with
  `config.remat` off and on; the same in every mode (each device keeps its shard's);
- compiled: XLA's `memory_analysis()` of the job's real step compiled for this machine's
  (simulated CPU) devices: arguments + temporaries + non-aliased outputs. XLA's CPU
  backend overlaps fewer buffers than the GPU/TPU ones (it also counts the recomputed
  activations of remat as extra temporaries), so read it as an upper bound.

    python benchmarks/memory.py --devices 8 --batch_per_device 32 \\
        --models vit_b vit_l vit_h vit_2b --modes pmap data fsdp [--remat both] [--json out.jsonl]

`--time MODEL` instead runs that model's step for real (remat off and on, alternated) and
prints the step time of each, to put the memory saved against the compute it costs.
"""
import argparse
import json
import os
import sys
import time


def _setup(devices: int) -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _config(model: str, mode: str, remat: bool, batch: int, img_size: int = 0):
  from mae_jax.jobs import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.pretrain_config(model)
  if img_size:
    config.model.img_size = img_size
  config.parallelism, config.remat, config.batch_size = mode, remat, batch
  config.total_steps, config.warmup_steps = 100, 10
  return config


def _abstract_inputs(config, layout, state):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size, batch = config.model.img_size, config.batch_size
  if layout.is_pmap:
    n = len(layout.devices)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), state)
    images = jax.ShapeDtypeStruct((n, batch // n, size, size, 3), jnp.float32)
    index = jax.ShapeDtypeStruct((n, batch // n), jnp.int32)
  else:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, layout.state_shardings(state))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                  sharding=layout.batch_sharding)
    index = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=layout.batch_sharding)
  return state, {'image': images, 'index': index}


_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's8': 1, 'u8': 1,
          'bool': 1, 'pred': 1, 's64': 8, 'u64': 8, 'key<fry>': 8}


def saved_activation_bytes(model: str, remat: bool, batch: int) -> int:
  """Bytes of what the loss's forward pass saves for its backward pass (not the params)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.ad_checkpoint  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  config = _config(model, 'pmap', remat, batch)
  mae = pretrain.create_model(config)
  size = config.model.img_size
  images = jnp.zeros((batch, size, size, 3), jnp.float32)
  params = jax.eval_shape(mae.init, {'params': jax.random.PRNGKey(0),
                                     'mask': jax.random.PRNGKey(0)}, images[:1])['params']
  loss = lambda p: mae.apply({'params': p}, images, example_ids=jnp.arange(batch),
                             rngs={'mask': jax.random.PRNGKey(1)})[0]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  total = 0
  for line in out.getvalue().splitlines():
    if 'from the argument' in line:
      continue  # the params themselves: already counted
    match = re.match(r'(\S+?)\[([\d,]*)\]', line)
    if match:
      shape = [int(d) for d in match.group(2).split(',') if d]
      total += math.prod(shape) * _BYTES.get(match.group(1), 4)
  return total


def measure(model: str, mode: str, remat: bool, batch_per_device: int,
            activations: int) -> dict:
  """One row of the table: bytes per device and compile time."""
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs import parallel, pretrain  # pylint: disable=g-import-not-at-top
  config = _config(model, mode, remat, batch_per_device * jax.device_count())
  mae = pretrain.create_model(config)
  schedule = pretrain.create_schedule(config, 100)
  layout = parallel.Layout(mode)
  state = pretrain.abstract_train_state(config, mae, schedule)

  def per_device(tree):  # pmap replicates everything on every device
    if layout.is_pmap:
      return parallel.total_bytes(tree)
    return parallel.bytes_per_device(tree, layout.state_shardings(tree))

  fns = pretrain.training_functions(mae, pretrain.optimizer_args(config), schedule, 1, mode)
  t0 = time.perf_counter()
  compiled = fns.p_train_step.lower(*_abstract_inputs(config, layout, state),
                                    jax.random.PRNGKey(0)).compile()
  analysis = compiled.memory_analysis()
  gb = 1e9
  needed = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
            analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  return dict(
      model=model, mode=mode, remat=remat, devices=jax.device_count(),
      batch_per_device=batch_per_device,
      params_m=sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
      params_gb=per_device(state.params) / gb, opt_state_gb=per_device(state.opt_state) / gb,
      activations_gb=activations / gb,
      state_and_activations_gb=(per_device(state.params) + per_device(state.opt_state) +
                                activations) / gb,
      compiled_temp_gb=analysis.temp_size_in_bytes / gb, compiled_total_gb=needed / gb,
      compile_s=time.perf_counter() - t0)


def time_remat(model: str, batch: int, img_size: int, steps: int, rounds: int) -> list:
  """Real steps of `model` with remat off and on, alternated; the median step time of each."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs import parallel, pretrain  # pylint: disable=g-import-not-at-top
  runs = {}
  for remat in (False, True):
    config = _config(model, 'pmap', remat, batch, img_size)
    mae = pretrain.create_model(config)
    schedule = pretrain.create_schedule(config, 100)
    fns = pretrain.training_functions(mae, pretrain.optimizer_args(config), schedule, 1,
                                      'pmap')
    layout = parallel.Layout('pmap')
    state = layout.put_state(pretrain.create_train_state(config, mae, jax.random.PRNGKey(0),
                                                         schedule))
    size = config.model.img_size
    host = {'image': np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(
        np.float32), 'index': np.arange(batch, dtype=np.int32)}
    batch_dev = jax.device_put(layout.put_batch(host))
    lowered = fns.p_train_step.lower(state, batch_dev, jax.random.PRNGKey(0))
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    runs[remat] = dict(step=fns.p_train_step, state=state, batch=batch_dev, temp=temp,
                       times=[])
    runs[remat]['state'], _ = fns.p_train_step(state, batch_dev, jax.random.PRNGKey(0))
  for _ in range(rounds):
    for remat, run in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        run['state'], metrics = run['step'](run['state'], run['batch'], jax.random.PRNGKey(1))
      jax.block_until_ready(metrics)
      run['times'].append((time.perf_counter() - t0) / steps)
  return [dict(model=model, img_size=img_size, batch=batch, remat=remat,
               step_s=float(np.median(run['times'])), step_s_all=run['times'],
               temp_gb=run['temp'] / 1e9, device=jax.devices()[0].device_kind)
          for remat, run in runs.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch_per_device', type=int, default=32)
  parser.add_argument('--models', nargs='+', default=['vit_b', 'vit_l', 'vit_h', 'vit_2b'])
  parser.add_argument('--modes', nargs='+', default=['pmap', 'data', 'fsdp'])
  parser.add_argument('--remat', choices=['off', 'on', 'both'], default='off')
  parser.add_argument('--json', help='append one JSON line per row here')
  parser.add_argument('--time', metavar='MODEL', help='time real steps of MODEL instead')
  parser.add_argument('--time_batch', type=int, default=8)
  parser.add_argument('--time_img_size', type=int, default=224)
  parser.add_argument('--time_steps', type=int, default=3)
  parser.add_argument('--time_rounds', type=int, default=3)
  args = parser.parse_args()
  _setup(1 if args.time else args.devices)
  if args.time:
    rows = time_remat(args.time, args.time_batch, args.time_img_size, args.time_steps,
                      args.time_rounds)
  else:
    remats = {'off': [False], 'on': [True], 'both': [False, True]}[args.remat]
    rows = []
    print('| model | params | mode | remat | params | AdamW state | activations | '
          'sum | compiled (CPU) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for model in args.models:
      for remat in remats:
        activations = saved_activation_bytes(model, remat, args.batch_per_device)
        for mode in args.modes:
          r = measure(model, mode, remat, args.batch_per_device, activations)
          rows.append(r)
          print(f"| {r['model']} | {r['params_m']:.0f}M | {r['mode']} | "
                f"{'on' if r['remat'] else 'off'} | {r['params_gb']:.2f} GB | "
                f"{r['opt_state_gb']:.2f} GB | {r['activations_gb']:.2f} GB | "
                f"{r['state_and_activations_gb']:.2f} GB | {r['compiled_total_gb']:.2f} GB |",
                flush=True)
  for r in rows:
    line = json.dumps(r)
    print(line, file=sys.stderr)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  main()
