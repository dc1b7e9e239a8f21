"""A synthetic segmentation set generated on the fly: textured scenes of shapes, exact masks.

Scene `i` of a split is drawn by NumPy from `default_rng([seed, split, i])` alone, so it is
the same on every machine and whatever else is generated. Each scene:

- a background texture: a sinusoidal grating (random orientation, 1.5-6 periods across
  the image, random phase) between two random colours, plus Gaussian noise (std 10);
- 2 to 5 shapes at random places, sizes (circumradius 10-25% of the side) and rotations,
  each filled with its own texture of the same family, later ones drawn over earlier ones;
- the class of a pixel is the kind of the shape on top there (0 = background). Membership
  is decided at the pixel centre, for the picture and the mask alike, so masks are exact.

Colours and textures are drawn independently of the kind, so only the outline tells the
classes apart. Kinds: disk, square, triangle (equilateral), ring (inner radius 55%),
cross (arms a third as thick as long). `classify` labels a scene by the kind covering
the most pixels, for the image-level jobs (pretraining reads only the pictures).
"""
import functools
from typing import Tuple

import numpy as np

SHAPES = ('disk', 'square', 'triangle', 'ring', 'cross')
CLASS_NAMES = ('background',) + SHAPES
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ('train', 'test')
# Colours of the classes for pictures (background grey).
PALETTE = np.array([[128, 128, 128], [230, 25, 75], [60, 180, 75], [255, 225, 25],
                    [0, 130, 200], [245, 130, 48]], np.uint8)


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """(S, S, 3) float: a grating between two random colours plus noise."""
  c0, c1 = rng.uniform(0, 255, (2, 3))
  theta = rng.uniform(0, np.pi)
  periods = rng.uniform(1.5, 6.0)
  phase = rng.uniform(0, 2 * np.pi)
  wave = 0.5 + 0.5 * np.sin(2 * np.pi * periods * (xx * np.cos(theta) + yy * np.sin(theta))
                            + phase)
  noise = rng.normal(0.0, 10.0, yy.shape + (3,))
  return c0 + (c1 - c0) * wave[..., None] + noise


def _inside(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
            angle: float) -> np.ndarray:
  """Bool (S, S): pixel centres inside the shape of circumradius `r` (image units)."""
  dy, dx = yy - cy, xx - cx
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  dist = np.hypot(u, v)
  if kind == 'disk':
    return dist < r
  if kind == 'ring':
    return (dist < r) & (dist > 0.55 * r)
  if kind == 'square':
    half = r / np.sqrt(2.0)
    return (np.abs(u) < half) & (np.abs(v) < half)
  if kind == 'triangle':  # three half-planes at the inradius r / 2
    inside = np.ones(yy.shape, bool)
    for k in range(3):
      a = 2 * np.pi * k / 3 + np.pi / 2
      inside &= u * np.cos(a) + v * np.sin(a) < r / 2
    return inside
  if kind == 'cross':
    arm = r / np.sqrt(1 + 1 / 9.0)  # the arm tips' corners lie on the circumcircle
    thin = arm / 3
    return ((np.abs(u) < arm) & (np.abs(v) < thin)) | ((np.abs(v) < arm) & (np.abs(u) < thin))
  raise ValueError(f'Unknown shape {kind!r}; the kinds are {SHAPES}.')


def scene(index: int, split: str, size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """Scene `index` of `split`: (image uint8 (size, size, 3), mask uint8 (size, size))."""
  if split not in SPLITS:
    raise ValueError(f'The synthetic scenes have splits {SPLITS}, not {split!r}: set '
                     'config.dataset.train_split/eval_split accordingly.')
  rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
  centres = (np.arange(size) + 0.5) / size
  yy, xx = np.meshgrid(centres, centres, indexing='ij')
  image = _texture(rng, yy, xx)
  mask = np.zeros((size, size), np.uint8)
  for _ in range(int(rng.integers(2, 6))):
    kind = int(rng.integers(len(SHAPES)))
    cy, cx = rng.uniform(0.15, 0.85, 2)
    r = rng.uniform(0.1, 0.25)
    inside = _inside(SHAPES[kind], yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
    fill = _texture(rng, yy, xx)
    image[inside] = fill[inside]
    mask[inside] = kind + 1
  return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


@functools.lru_cache(maxsize=8)
def generate(split: str, num: int, size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """Scenes 0..num-1 of `split`: images (num, size, size, 3) uint8, masks (num, size, size)."""
  if num <= 0 or size <= 0:
    raise ValueError(f'Need a positive number of scenes and size, got num={num}, size={size}: '
                     'set config.dataset.scenes_train/scenes_eval/scene_size.')
  pairs = [scene(i, split, size, seed) for i in range(num)]
  images = np.stack([p[0] for p in pairs])
  masks = np.stack([p[1] for p in pairs])
  images.setflags(write=False)
  masks.setflags(write=False)
  return images, masks


def classify(masks: np.ndarray) -> np.ndarray:
  """(N,) int32 image labels in [0, len(SHAPES)): the shape kind covering the most pixels."""
  counts = np.stack([(masks == k + 1).reshape(len(masks), -1).sum(1)
                     for k in range(len(SHAPES))], axis=1)
  return np.argmax(counts, axis=1).astype(np.int32)


def colorize(mask: np.ndarray) -> np.ndarray:
  """A class mask as an RGB picture (PALETTE colours; the ignore label 255 black)."""
  out = np.zeros(mask.shape + (3,), np.uint8)
  known = mask < NUM_CLASSES
  out[known] = PALETTE[mask[known]]
  return out
