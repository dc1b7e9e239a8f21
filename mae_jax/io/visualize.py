"""The paper's reconstruction figure: original | masked | reconstruction | reconstruction + visible.

Predictions of a norm-pix model live in per-patch normalised space; to show them, each
predicted patch is mapped back with the mean and unbiased (ddof=1) std of the *original*
patch (the same statistics the loss normalised the target with), then the dataset
mean/std normalisation is undone. Skipping either step gives the "reconstructions look
wrong" pictures users of the PyTorch release keep reporting.
"""
from typing import Dict, Sequence

import numpy as np
from PIL import Image

from mae_jax.model.patches import patchify, unpatchify

COLUMNS = ('original', 'masked', 'reconstruction', 'reconstruction + visible')


def reconstruction_panels(images: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                          patch_size: int, norm_pix_loss: bool, mean: Sequence[float],
                          std: Sequence[float], eps: float = 1e-6) -> Dict[str, np.ndarray]:
  """The four panels of the figure as float images in [0, 1], each (B, H, W, C).

  Args:
    images: (B, H, W, C) dataset-normalised model inputs.
    pred: (B, L, p*p*C) model predictions.
    mask: (B, L), 1 = removed.
    patch_size: p.
    norm_pix_loss: whether `pred` is in per-patch normalised space.
    mean, std: the dataset normalisation (per channel) to undo.
    eps: the variance epsilon of the norm-pix target (1e-6 in the reference).
  """
  images = np.asarray(images, np.float32)
  pred = np.asarray(pred, np.float32)
  mask = np.asarray(mask, np.float32)
  b, h, w, c = images.shape
  grid = (h // patch_size, w // patch_size)
  if norm_pix_loss:
    target = np.asarray(patchify(images, patch_size))
    pred = (pred * np.sqrt(target.var(axis=-1, ddof=1, keepdims=True) + eps)
            + target.mean(axis=-1, keepdims=True))
  recon = np.asarray(unpatchify(pred, patch_size, grid, c))
  removed = np.asarray(unpatchify(
      np.repeat(mask[..., None], patch_size * patch_size * c, axis=-1), patch_size, grid, c))
  mean = np.asarray(mean, np.float32).reshape(1, 1, 1, -1)
  std = np.asarray(std, np.float32).reshape(1, 1, 1, -1)

  def to_unit(x):
    return np.clip(x * std + mean, 0.0, 1.0)

  # Removed patches show as 0 in normalised space, i.e. the dataset mean colour (as in
  # the reference's demo notebook).
  return {
      'original': to_unit(images),
      'masked': to_unit(images * (1 - removed)),
      'reconstruction': to_unit(recon),
      'reconstruction + visible': to_unit(images * (1 - removed) + recon * removed),
  }


def grid_image(panels: Dict[str, np.ndarray], min_tile: int = 112, pad: int = 2) -> np.ndarray:
  """One uint8 picture: a row per example, the four `COLUMNS` left to right.

  Small images are enlarged (nearest neighbour, integer factor) to at least `min_tile`
  pixels so patches stay visible.
  """
  columns = [panels[name] for name in COLUMNS]
  b, h, w, c = columns[0].shape
  scale = max(1, -(-min_tile // max(h, w)))
  th, tw = h * scale, w * scale
  out = np.ones((b * (th + pad) + pad, len(columns) * (tw + pad) + pad, c), np.float32)
  for j, col in enumerate(columns):
    big = col.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(b):
      y, x = pad + i * (th + pad), pad + j * (tw + pad)
      out[y:y + th, x:x + tw] = big[i]
  return (out * 255 + 0.5).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, 3) image."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')
