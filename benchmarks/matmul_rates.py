"""Matrix-product rates of XLA's CPU backend against PyTorch's, at the train steps' shapes.

    python benchmarks/matmul_rates.py [--threads 2] [--dtypes float32,bfloat16] [--json FILE]

The pretraining step's time on the CPU is about half matrix products (README), so when
mae_jax's step is behind PyTorch's on a machine, this says whether the kernels are why:
each (m, k, n) product is timed in JAX (jit, `a @ b`) and in torch (`a @ b`, torch threads =
the cores), alternating per shape, in float32 and bfloat16. The default shapes are the ViT-Ti
benchmark step's (batch 32: 544 kept tokens x width 192, the MLP's 192 x 768, the decoder's
2,080 tokens x 128) and ViT-S's (batch 8: 400 tokens x 384), plus a 1024^3 and a 2048^3
reference. One JSON line per shape, dtype and framework: GFLOP/s = 2 m k n / median time.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step  # pylint: disable=wrong-import-position

SHAPES = ((544, 192, 576), (544, 192, 768), (544, 768, 192), (2080, 128, 512),
          (400, 384, 1536), (400, 1536, 384), (1024, 1024, 1024), (2048, 2048, 2048))


def parse_shapes(text: str):
  """'544x192x576,1024x1024x1024' -> ((544, 192, 576), (1024, 1024, 1024))."""
  try:
    shapes = tuple(tuple(int(d) for d in s.split('x')) for s in text.split(','))
  except ValueError:
    shapes = ()
  if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
    raise SystemExit(f'--shapes {text!r}: give m x k x n products, e.g. 544x192x576,1024x1024x1024')
  return shapes


def time_calls(fn, sync, seconds: float) -> float:
  """Median seconds per call over ~`seconds` (at least 5 calls), after 2 warm-up calls."""
  for _ in range(2):
    sync(fn())
  times, start = [], time.perf_counter()
  while len(times) < 5 or time.perf_counter() - start < seconds:
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--threads', type=int, default=0, help='pin to this many cores (0: all)')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--shapes', default='', help='m x k x n list (default: the steps\' shapes)')
  parser.add_argument('--seconds', type=float, default=0.5, help='per shape, dtype, framework')
  parser.add_argument('--no_torch', action='store_true', help='JAX only')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  dtypes = args.dtypes.split(',')
  if not set(dtypes) <= {'float32', 'bfloat16'}:
    raise SystemExit(f'--dtypes {args.dtypes!r}: use float32 and/or bfloat16.')
  shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
  cpus = bench_train_step.pin_cpus(args.threads)  # before JAX starts its thread pool
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  torch = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(len(cpus))
  started = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  common = dict(cpus=cpus, started=started, host_cpu=bench_train_step.host_cpu(),
                jax=jax.__version__, torch=torch.__version__ if torch else None)
  matmul = jax.jit(lambda a, b: a @ b)
  for m, k, n in shapes:
    for dtype in dtypes:
      a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(dtype)
      b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(dtype)
      runs = [('jax', lambda: matmul(a, b), jax.block_until_ready)]
      if torch is not None:
        ta = torch.from_numpy(np.array(a.astype(jnp.float32))).to(getattr(torch, dtype))
        tb = torch.from_numpy(np.array(b.astype(jnp.float32))).to(getattr(torch, dtype))
        runs.append(('torch', lambda: ta @ tb, lambda x: x))
      for framework, fn, sync in runs:
        seconds = time_calls(fn, sync, args.seconds)
        bench_train_step.emit(dict(framework=framework, m=m, k=k, n=n, dtype=dtype,
                                   seconds=seconds, gflops_per_s=2 * m * k * n / seconds / 1e9,
                                   **common), args.json)


if __name__ == '__main__':
  main()
