"""Input pipeline per core: mae_jax's pretraining transform against a torchvision-style PIL one.

python benchmarks/pipeline_vs_pil.py [--images=DIR] [--size=224] [--rounds=3] [--json=FILE]

Both run on one core, on the same JPEG files, alternating round by round, each round in a
new process of its own (so that neither's background threads bill the other):
- mae_jax: `mae_jax.data.pipeline.create_dataset(mode='pretrain')` on an ImageFolder, its
  tf.data graph on a private one-thread pool (decode of the crop window only, bicubic
  resize, flip, normalise, batching);
- PIL: what the official code's loader does per image (`Image.open().convert('RGB')`,
  torchvision's RandomResizedCrop box at scale (0.2, 1), `resize(BICUBIC)`, flip, to a
  normalised float32 array), PIL's decoder at full size, then the same batching in NumPy.
Without --images it writes ImageNet-like files first: 500 x 375 JPEGs (quality 90) cut
from scikit-image's photos. Reports images/s per busy core (CPU time of this process).
"""
import argparse
import json
import math
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One core for both, set before any library starts its threads (they inherit it).
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step  # pylint: disable=wrong-import-position  # host_cpu()

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def write_imagenet_like(root: pathlib.Path, count: int) -> None:
  """`count` 500 x 375 JPEGs in root/train/{a,b}/, cut at random from scikit-image photos."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  photos = [getattr(data, n)() for n in ('astronaut', 'coffee', 'chelsea', 'rocket',
                                         'hubble_deep_field', 'immunohistochemistry')]
  rng = random.Random(0)
  for i in range(count):
    photo = Image.fromarray(photos[i % len(photos)]).convert('RGB')
    w, h = photo.size
    scale = max(500 / w, 375 / h) * rng.uniform(1.0, 1.6)
    photo = photo.resize((math.ceil(w * scale), math.ceil(h * scale)), Image.BICUBIC)
    left = rng.randrange(photo.size[0] - 500 + 1)
    top = rng.randrange(photo.size[1] - 375 + 1)
    out = root / 'train' / 'ab'[i % 2] / f'{i:04d}.jpg'
    out.parent.mkdir(parents=True, exist_ok=True)
    photo.crop((left, top, left + 500, top + 375)).save(out, quality=90)


def rrc_box(width: int, height: int, rng: random.Random, scale=(0.2, 1.0),
            ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params -> (top, left, h, w)."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  w, h = width, height
  if width / height < ratio[0]:
    h = int(round(w / ratio[0]))
  elif width / height > ratio[1]:
    w = int(round(h * ratio[1]))
  return (height - h) // 2, (width - w) // 2, h, w


def pil_batches(files, size: int, batch: int, seed: int = 0):
  rng = random.Random(seed)
  while True:
    images = np.empty((batch, size, size, 3), np.float32)
    for j in range(batch):
      with Image.open(files[rng.randrange(len(files))]) as im:
        im = im.convert('RGB')
        top, left, h, w = rrc_box(im.size[0], im.size[1], rng)
        im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
          im = im.transpose(Image.FLIP_LEFT_RIGHT)
        images[j] = (np.asarray(im, np.float32) - MEAN) / STD
    yield images


def mae_jax_batches(root: str, size: int, batch: int):
  from mae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = pipeline.default_dataset_config()
  cfg.source, cfg.data_dir, cfg.eval_split = 'imagefolder', root, 'train'
  return pipeline.create_dataset(cfg, split='train', mode='pretrain', global_batch_size=batch,
                                 image_size=size, seed=0, process_index=0, process_count=1)


def rate(batches, batch: int, seconds: float) -> float:
  """Images per CPU-second of this process over about `seconds` of wall time."""
  n, wall, cpu = 0, time.time(), time.process_time()
  while time.time() - wall < seconds:
    next(batches)
    n += batch
  return n / (time.process_time() - cpu)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--images', default='', help='an ImageFolder root (with train/); default: '
                 'generated 500x375 JPEGs')
  p.add_argument('--count', type=int, default=256, help='generated files')
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--seconds', type=float, default=10)
  p.add_argument('--json', default='')
  p.add_argument('--only', default='', choices=['', 'mae_jax', 'pil'], help=argparse.SUPPRESS)
  a = p.parse_args()
  root = a.images or tempfile.mkdtemp(prefix='imagenet_like_')
  if not a.images:
    write_imagenet_like(pathlib.Path(root), a.count)
  if a.only:  # one round of one pipeline: print its rate
    if a.only == 'pil':
      files = sorted(str(f) for f in pathlib.Path(root, 'train').rglob('*.jpg'))
      batches = pil_batches(files, a.size, a.batch)
    else:
      batches = mae_jax_batches(root, a.size, a.batch)
    for _ in range(3):  # warm up: graph building, tf.data autotune, file cache
      next(batches)
    print(json.dumps({a.only: rate(batches, a.batch, a.seconds)}))
    return
  files = list(pathlib.Path(root, 'train').rglob('*.jpg'))
  started = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  rounds = []
  for r in range(a.rounds):
    rounds.append({'round': r})
    for name in ('mae_jax', 'pil'):
      out = subprocess.run([sys.executable, __file__, f'--images={root}', f'--only={name}',
                            f'--size={a.size}', f'--batch={a.batch}', f'--seconds={a.seconds}'],
                           check=True, capture_output=True, text=True).stdout
      rounds[-1].update(json.loads(out.strip().splitlines()[-1]))
    print(f"round {r}: mae_jax {rounds[-1]['mae_jax']:.0f} img/s per core, "
          f"PIL {rounds[-1]['pil']:.0f}", flush=True)
  med = {k: statistics.median(x[k] for x in rounds) for k in ('mae_jax', 'pil')}
  result = dict(size=a.size, batch=a.batch, files=len(files), source=a.images or
                'generated 500x375 JPEGs (q90)', rounds=rounds, median=med,
                ratio=med['mae_jax'] / med['pil'], python=sys.version.split()[0],
                started=started, host_cpu=bench_train_step.host_cpu())
  print(f"median: mae_jax {med['mae_jax']:.0f}, PIL {med['pil']:.0f} img/s per core: "
        f"{result['ratio']:.2f}x")
  if a.json:
    with open(a.json, 'a') as f:
      f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  main()
