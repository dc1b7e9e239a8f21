"""Times the pretraining step as the job runs it, against the PyTorch yardstick in the same run.

The JAX step is mae_jax.jobs.pretrain's: the same compiled function (pmapped over all
local devices, or jitted over the mesh with --parallelism), AdamW with the recipe's
schedule, donated state, a batch already on the devices. PyTorch is Hugging Face's
`ViTMAEForPreTraining` at identical dims with AdamW (bf16 autocast for --dtype bfloat16).
With --repeats the frameworks alternate, so both see the same machine state.

    python benchmarks/bench_train_step.py --model small_cpu --batch 64 --torch --repeats 3
    python benchmarks/bench_train_step.py --model vit_s --batch 8 --threads 2 --torch
    python benchmarks/bench_train_step.py --model vit_l --batch 128 --dtype bfloat16 --json r.jsonl
    python benchmarks/bench_train_step.py --model vit_b --set decoder_depth=4 --set img_size=32 ...
    python benchmarks/bench_train_step.py --model vit_l --batch 8 --vs_mask_tokens --repeats 2

Prints one JSON line per measurement: images/s, step time, compile time (apart), the
FLOPs per image it assumes and how they are counted (matmul FLOPs of the model, forward
x 3 for a training step, the usual MFU convention; XLA's own count of the compiled step is
printed beside it), achieved FLOP/s, MFU against the device's dense peak (on CPU: a large
matmul timed in the same run, in the step's dtype), and peak memory.
On the CPU the process keeps freed memory for reuse as the job does (mae_jax.jobs.host_memory;
MAE_JAX_KEEP_HOST_MEMORY=0 turns it off, for both frameworks, as they share the process;
--vs_mask_tokens leaves it off). Each line says which (`host_memory_kept`), when the run
started and on what CPU; `benchmarks/speed_table.py` turns the lines into README's table.
With --vs_mask_tokens a last line gives the visible-only speed-up over the mask-token baseline
(median step times of the repeats).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

# Dense peak FLOP/s per chip (bf16 / fp16 tensor cores) from the vendors' data sheets.
PEAK_BF16 = {
    'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'GH200': 989e12, 'B200': 2250e12,
    'A100': 312e12, 'A800': 312e12, 'L40S': 362e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'TPU v3': 123e12,
}


def model_dims(name: str, overrides) -> dict:
  from mae_jax.model import presets  # pylint: disable=g-import-not-at-top
  dims = presets.model_config(name, norm_pix_loss=True).to_dict()
  for item in overrides or ():
    key, _, value = item.partition('=')
    if key not in dims:
      raise SystemExit(f'--set {item}: {key!r} is not a model field ({sorted(dims)})')
    dims[key] = type(dims[key])(value) if not isinstance(dims[key], bool) else value == 'True'
  return dims


def train_flops_per_image(dims: dict) -> float:
  """Matmul FLOPs of one image through forward + backward (3 x forward), as MFU counts them.

  Encoder on the kept tokens (1 + L * (1 - mask_ratio); all L with mask tokens in the
  encoder), patch embedding on every patch, decoder on 1 + L tokens; per block 2 * T * (4 +
  2 * mlp_ratio) * D^2 for the projections and 4 * T^2 * D for attention.
  """
  p, c = dims['patch_size'], dims['in_chans']
  size = dims['img_size'] if isinstance(dims['img_size'], int) else dims['img_size'][0]
  patches = (size // p) ** 2
  kept = patches if dims['mask_token_in_encoder'] else int(patches * (1 - dims['mask_ratio']))

  def blocks(tokens, width, depth):
    per = 2 * tokens * (4 + 2 * dims['mlp_ratio']) * width ** 2 + 4 * tokens ** 2 * width
    return depth * per

  d, dd = dims['embed_dim'], dims['decoder_embed_dim']
  forward = (2 * patches * p * p * c * d + blocks(1 + kept, d, dims['depth']) +
             2 * (1 + kept) * d * dd + blocks(1 + patches, dd, dims['decoder_depth']) +
             2 * (1 + patches) * dd * p * p * c)
  return 3.0 * forward


def cpu_matmul_peak(dtype: str, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on this CPU (the CPU's practical peak for MFU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best


def host_cpu() -> str:
  """The host CPU's model name and logical core count (Linux), e.g. 'AMD EPYC, 2 cores'."""
  name = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                  name)
  except OSError:
    pass
  return f'{name}, {os.cpu_count()} cores'


def device_peak(device, dtype: str):
  """(peak FLOP/s, how it was obtained) for MFU."""
  kind = device.device_kind
  if device.platform == 'cpu':
    return cpu_matmul_peak(dtype), f'{dtype} 2048^2 matmul timed in this run'
  for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return peak, f'{name} dense bf16 data-sheet peak'
  return None, f'unknown peak for {kind!r}'


def bench_jax(dims: dict, batch: int, steps: int, warmup: int, parallelism: str, remat: bool,
              state=None):
  """Times the job's compiled step; returns (result dict, reusable setup)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs import parallel, pretrain, recipes  # pylint: disable=g-import-not-at-top
  if state is None:
    config = recipes.pretrain_config('tiny')
    config.model.update(dims)
    config.batch_size, config.parallelism, config.remat = batch, parallelism, remat
    config.total_steps, config.warmup_steps = 1000, 10
    pretrain.check_config(config)
    model = pretrain.create_model(config)
    schedule = pretrain.create_schedule(config, 1000)
    layout = parallel.Layout(parallelism)
    fns = pretrain.training_functions(model, pretrain.optimizer_args(config), schedule, 1,
                                      parallelism)
    train_state = layout.put_state(pretrain.create_train_state(
        config, model, jax.random.PRNGKey(0), schedule))
    size = pretrain.input_image_size(config)
    rng = np.random.default_rng(0)
    host = {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            'index': np.arange(batch)}
    device_batch = next(layout.batches(iter([pretrain.step_fields(host)]), 1))
    t0 = time.perf_counter()
    compiled = fns.p_train_step.lower(train_state, device_batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get('flops', 0.0)) * (len(layout.devices) if layout.is_pmap else 1)
    analysis = compiled.memory_analysis()
    state = dict(step=fns.p_train_step, train_state=train_state, batch=device_batch,
                 compile_s=compile_s, xla_flops_per_image=xla_flops / batch,
                 compiled_bytes=(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
                                 analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
                 if analysis is not None else None)
  step, key = state['step'], jax.random.PRNGKey(1)
  for _ in range(warmup):
    state['train_state'], metrics = step(state['train_state'], state['batch'], key)
  if warmup:
    jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state['train_state'], metrics = step(state['train_state'], state['batch'], key)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t0) / steps
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  out = dict(framework='jax', device=device.device_kind, platform=device.platform,
             devices=jax.device_count(), jax=jax.__version__, parallelism=parallelism,
             remat=remat, step_s=dt, images_per_s=batch / dt, compile_s=state['compile_s'],
             xla_flops_per_image=state['xla_flops_per_image'],
             loss=parallel.scalar(metrics['loss']),
             peak_bytes_in_use=stats.get('peak_bytes_in_use'),
             compiled_bytes_per_device=state['compiled_bytes'],
             max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return out, state


def bench_torch(dims: dict, batch: int, steps: int, warmup: int, dtype: str, state=None):
  """Times Hugging Face ViTMAEForPreTraining (forward, loss, backward, AdamW)."""
  import torch  # pylint: disable=g-import-not-at-top
  if state is None:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=g-import-not-at-top
    if dims['mask_token_in_encoder']:
      return dict(framework='torch', skipped='ViTMAE has no mask-token-in-encoder variant'), None
    cfg = ViTMAEConfig(
        image_size=dims['img_size'], patch_size=dims['patch_size'], num_channels=3,
        hidden_size=dims['embed_dim'], num_hidden_layers=dims['depth'],
        num_attention_heads=dims['num_heads'],
        intermediate_size=int(dims['embed_dim'] * dims['mlp_ratio']),
        decoder_hidden_size=dims['decoder_embed_dim'],
        decoder_num_hidden_layers=dims['decoder_depth'],
        decoder_num_attention_heads=dims['decoder_num_heads'],
        decoder_intermediate_size=int(dims['decoder_embed_dim'] * dims['mlp_ratio']),
        mask_ratio=dims['mask_ratio'], norm_pix_loss=dims['norm_pix_loss'], layer_norm_eps=1e-6,
        hidden_act='gelu')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = ViTMAEForPreTraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch, 3, dims['img_size'], dims['img_size'], device=device)
    state = dict(model=model, opt=opt, images=images, device=device)
  model, opt, images, device = state['model'], state['opt'], state['images'], state['device']
  amp = dtype == 'bfloat16'

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
      loss = model(pixel_values=images).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  for _ in range(warmup):
    loss = step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  dt = (time.perf_counter() - t0) / steps
  name = torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'
  return dict(framework='torch', device=name, torch=torch.__version__,
              threads=torch.get_num_threads(), step_s=dt, images_per_s=batch / dt,
              loss=float(loss.detach()),
              peak_bytes_in_use=(torch.cuda.max_memory_allocated() if device == 'cuda' else None),
              max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='small_cpu', help='a mae_jax.model.presets name')
  parser.add_argument('--set', action='append', metavar='FIELD=VALUE',
                      help='override a config.model field (repeatable)')
  parser.add_argument('--batch', type=int, default=64, help='global batch')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--parallelism', default='pmap', choices=['pmap', 'data', 'fsdp'])
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--mask_token_in_encoder', action='store_true')
  parser.add_argument('--vs_mask_tokens', action='store_true',
                      help='also time the mask-tokens-through-the-encoder baseline, alternating '
                           'with the real step in this process, and print the speed-up')
  parser.add_argument('--torch', action='store_true', help='also time the PyTorch yardstick')
  parser.add_argument('--no_jax', action='store_true')
  parser.add_argument('--repeats', type=int, default=1, help='alternate the frameworks this often')
  parser.add_argument('--threads', type=int, default=0,
                      help='CPU cores for both frameworks (0: all this process may use); the '
                           'process is pinned to that many cores, as XLA sizes its pool by them')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='simulated CPU devices for JAX (one pmap shard per core)')
  parser.add_argument('--json', help='append the JSON lines to this file')
  args = parser.parse_args()
  flags = os.environ.get('XLA_FLAGS', '')
  cpus = pin_cpus(args.threads)
  if args.cpu_devices:
    flags += f' --xla_force_host_platform_device_count={args.cpu_devices}'
  os.environ['XLA_FLAGS'] = flags.strip()
  # As the job does (before JAX starts): on the CPU, malloc keeps each step's scratch memory.
  # Not with --vs_mask_tokens: two models' steps alternate, and each one's scratch block would
  # stay in the heap beside the other's (ViT-L at batch 8: more than 24 GB).
  from mae_jax.jobs import host_memory  # pylint: disable=g-import-not-at-top
  kept = False if args.vs_mask_tokens else host_memory.keep_freed_memory()
  started = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  if args.threads and args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
  overrides = list(args.set or []) + [f'dtype={args.dtype}']
  # (key, framework, mask tokens through the encoder): what alternates in each repeat.
  runs = [] if args.no_jax else [('jax', 'jax', args.mask_token_in_encoder)]
  if args.vs_mask_tokens and not args.no_jax:
    runs.append(('jax_mask_tokens', 'jax', True))
  if args.torch:
    runs.append(('torch', 'torch', args.mask_token_in_encoder))
  dims = {key: model_dims(args.model, overrides + (['mask_token_in_encoder=True'] if mt else []))
          for key, _, mt in runs}
  peak = None
  states = {key: None for key, _, _ in runs}
  step_s = {key: [] for key, _, _ in runs}
  for _ in range(args.repeats):
    for key, framework, mask_tokens in runs:
      flops = train_flops_per_image(dims[key])
      common = dict(model=args.model, overrides=args.set or [], batch=args.batch,
                    dtype=args.dtype, threads=args.threads or None, cpus=cpus,
                    cpu_devices=args.cpu_devices or None, host_memory_kept=kept,
                    started=started, host_cpu=host_cpu(), mask_token_in_encoder=mask_tokens,
                    flops_per_image=flops, flops_counted='matmuls, 3 x forward')
      if framework == 'jax':
        out, states[key] = bench_jax(dims[key], args.batch, args.steps, args.warmup,
                                     args.parallelism, args.remat, states[key])
        if peak is None:
          import jax  # pylint: disable=g-import-not-at-top
          peak = device_peak(jax.devices()[0], args.dtype)
      else:
        out, states[key] = bench_torch(dims[key], args.batch, args.steps, args.warmup,
                                       args.dtype, states[key])
      if 'step_s' in out:
        step_s[key].append(out['step_s'])
        out['achieved_flops_per_s'] = flops * out['images_per_s']
        if peak is not None and peak[0]:
          # On CPU the peak is measured with every JAX device's cores: per chip for accelerators.
          chips = out.get('devices', 1) if out.get('platform') != 'cpu' else 1
          out['mfu'] = out['achieved_flops_per_s'] / (peak[0] * chips)
          out['peak_flops_per_s'], out['peak_from'] = peak
      emit({**common, **out}, args.json)
  if args.vs_mask_tokens and step_s.get('jax') and step_s.get('jax_mask_tokens'):
    visible, baseline = statistics.median(step_s['jax']), statistics.median(step_s['jax_mask_tokens'])
    emit(dict(model=args.model, overrides=args.set or [], batch=args.batch, dtype=args.dtype,
              comparison='visible-only encoder vs mask tokens through the encoder',
              visible_only_step_s=visible, mask_tokens_step_s=baseline,
              speedup=baseline / visible, repeats=args.repeats), args.json)


def pin_cpus(threads: int) -> list:
  """Pins this process to its first `threads` allowed cores (0: leaves it); returns its cores.

  XLA's CPU client sizes its thread pool by the cores the process may run on, and takes no
  flag for it (the folklore `intra_op_parallelism_threads=N` in XLA_FLAGS is not a flag: it
  ends flag parsing, so the flags after it are dropped). Must run before JAX starts.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if threads:
    if threads > len(allowed):
      raise SystemExit(f'--threads {threads}: this process may use only {len(allowed)} '
                       f'core(s) ({allowed}); pass at most {len(allowed)}.')
    os.sched_setaffinity(0, allowed[:threads])
  return sorted(os.sched_getaffinity(0))  # what the process got, not what was asked


def emit(row: dict, path) -> None:
  """Prints one JSON line and appends it to `path` if given."""
  line = json.dumps(row)
  print(line, flush=True)
  if path:
    with open(path, 'a') as f:
      f.write(line + '\n')

if __name__ == '__main__':
  main()
