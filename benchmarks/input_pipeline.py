"""Images/s of mae_jax.data.pipeline on this machine (pretrain mode unless --mode).

python benchmarks/input_pipeline.py --source=embedded --size=32
python benchmarks/input_pipeline.py --source=imagefolder --data_dir=/tmp/cifar --size=32
python benchmarks/input_pipeline.py --source=imagefolder --data_dir=/tmp/cifar --bad_images=skip
"""
import argparse
import time

from mae_jax.data import pipeline as ip

p = argparse.ArgumentParser()
p.add_argument('--source', default='embedded')
p.add_argument('--data_dir', default='')
p.add_argument('--size', type=int, default=32)
p.add_argument('--batch', type=int, default=256)
p.add_argument('--mode', default='pretrain')
p.add_argument('--seconds', type=float, default=20)
p.add_argument('--split', default='train')
p.add_argument('--bad_images', default=None, help="config.dataset.bad_images ('error', 'skip')")
a = p.parse_args()
cfg = ip.default_dataset_config()
cfg.source = a.source
cfg.data_dir = a.data_dir
if a.bad_images:
  cfg.bad_images = a.bad_images
t0 = time.time()
it = ip.create_dataset(cfg, split=a.split, mode=a.mode, global_batch_size=a.batch, image_size=a.size,
                       seed=0, process_index=0, process_count=1)
next(it)
t1 = time.time()
for _ in range(3):  # warm up autotune
  next(it)
n, t2, c2 = 0, time.time(), time.process_time()
while time.time() - t2 < a.seconds:
  next(it)
  n += a.batch
dt = time.time() - t2
cpu = time.process_time() - c2
print(f'{a.source} {a.mode} {a.size}px batch {a.batch} bad_images={a.bad_images}: first batch {t1 - t0:.1f}s, '
      f'{n / dt:.0f} images/s over {dt:.0f}s, {1e6 * cpu / n:.0f} us CPU per image '
      f'({n / cpu:.0f} images/s per busy core)')
