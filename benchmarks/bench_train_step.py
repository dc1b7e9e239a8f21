"""Times one MAE pretraining step (forward, backward, AdamW update) in mae_jax and in PyTorch.

The PyTorch yardstick is Hugging Face `ViTMAEForPreTraining` with the same sizes, the
same mask ratio and the same optimiser, on the same machine. Prints one JSON line per
measurement, e.g.

    python benchmarks/bench_train_step.py --model small_cpu --batch 64 --torch
    python benchmarks/bench_train_step.py --model vit_l --batch 256 --dtype bfloat16 --torch

Steady-state time only: the first `--warmup` steps (compilation) are not counted.
"""
import argparse
import json
import os
import platform
import time


def model_dims(name: str) -> dict:
  from mae_jax.model.presets import MODELS  # pylint: disable=g-import-not-at-top
  dims = dict(in_chans=3, mlp_ratio=4.0, norm_pix_loss=True, mask_ratio=0.75)
  dims.update(MODELS[name])
  return dims


def bench_jax(dims: dict, batch: int, steps: int, warmup: int, dtype: str,
              mask_token_in_encoder: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mae_jax import MaskedAutoencoder  # pylint: disable=g-import-not-at-top

  model = MaskedAutoencoder(**dims, dtype=dtype, mask_token_in_encoder=mask_token_in_encoder)
  size = dims['img_size']
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
  params = jax.jit(model.init)({'params': jax.random.key(1), 'mask': jax.random.key(2)},
                               images)['params']
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  opt_state = tx.init(params)

  def step(params, opt_state, images, key):
    def loss_fn(p):
      return model.apply({'params': p}, images, example_ids=jnp.arange(batch),
                         rngs={'mask': key})[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  for i in range(warmup):
    params, opt_state, loss = step(params, opt_state, images, jax.random.key(i))
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, images, jax.random.key(100 + i))
  jax.block_until_ready(loss)
  dt = (time.perf_counter() - t0) / steps
  return dict(framework='jax', device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              step_s=dt, images_per_s=batch / dt, loss=float(loss))


def bench_torch(dims: dict, batch: int, steps: int, warmup: int, dtype: str,
                mask_token_in_encoder: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=g-import-not-at-top
  if mask_token_in_encoder:
    return dict(framework='torch', skipped='ViTMAE has no mask-token-in-encoder variant')
  cfg = ViTMAEConfig(
      image_size=dims['img_size'], patch_size=dims['patch_size'], num_channels=3,
      hidden_size=dims['embed_dim'], num_hidden_layers=dims['depth'],
      num_attention_heads=dims['num_heads'], intermediate_size=int(dims['embed_dim'] * 4),
      decoder_hidden_size=dims['decoder_embed_dim'],
      decoder_num_hidden_layers=dims['decoder_depth'],
      decoder_num_attention_heads=dims['decoder_num_heads'],
      decoder_intermediate_size=int(dims['decoder_embed_dim'] * 4), mask_ratio=0.75,
      norm_pix_loss=True, layer_norm_eps=1e-6, hidden_act='gelu')
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = ViTMAEForPreTraining(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  size = dims['img_size']
  images = torch.randn(batch, 3, size, size, device=device)
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
  return dict(framework='torch', device=name, torch=torch.__version__, threads=torch.get_num_threads(),
              step_s=dt, images_per_s=batch / dt, loss=float(loss.detach()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='small_cpu')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--mask_token_in_encoder', action='store_true')
  parser.add_argument('--torch', action='store_true', help='also time the PyTorch yardstick')
  parser.add_argument('--no_jax', action='store_true')
  parser.add_argument('--repeats', type=int, default=1, help='alternate the frameworks this often')
  parser.add_argument('--threads', type=int, default=0,
                      help='CPU threads for both frameworks (0: their defaults). On a shared '
                      'machine, 1 avoids torch\'s spinning OpenMP threads distorting the comparison.')
  args = parser.parse_args()
  if args.threads:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                               f'{str(args.threads > 1).lower()} intra_op_parallelism_threads='
                               f'{args.threads}')
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
  dims = model_dims(args.model)
  common = dict(model=args.model, batch=args.batch, dtype=args.dtype, threads=args.threads or None,
                mask_token_in_encoder=args.mask_token_in_encoder)
  for _ in range(args.repeats):
    runs = ([] if args.no_jax else [bench_jax]) + ([bench_torch] if args.torch else [])
    for bench in runs:
      out = bench(dims, args.batch, args.steps, args.warmup, args.dtype, args.mask_token_in_encoder)
      print(json.dumps({**common, **out}), flush=True)


if __name__ == '__main__':
  main()
