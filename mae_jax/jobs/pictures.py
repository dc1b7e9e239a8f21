"""The pretraining job's reconstruction pictures: a fixed held-out batch, a fixed mask.

`heldout_images` picks the images once; `Visualizer` reconstructs them with the current
params and writes `reconstructions/step_XXXXXXX.png` (the paper's four columns).
"""
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax.data import pipeline
from mae_jax.io import visualize
from mae_jax.model.mae import MaskedAutoencoder


class Visualizer:
  """Reconstructs a fixed held-out batch with a fixed mask and writes the paper's figure."""

  def __init__(self, model: MaskedAutoencoder, config: ml_collections.ConfigDict,
               images: np.ndarray, workdir: str, reconstruct: Callable):
    self.model = model
    self.config = config
    self.images = jnp.asarray(images)
    self.out_dir = f'{workdir}/reconstructions'
    self.rng = jax.random.PRNGKey(config.seed + 1)
    self._apply = reconstruct

  def __call__(self, step: int, params: Any) -> Tuple[float, np.ndarray]:
    """Writes reconstructions/step_XXXXXXX.png; returns (held-out loss, picture)."""
    loss, pred, mask = self._apply(params, self.images, self.rng)
    panels = visualize.reconstruction_panels(
        self.images, pred, mask, self.model.patch_size, self.model.norm_pix_loss,
        self.config.dataset.mean, self.config.dataset.std)
    picture = visualize.grid_image(panels)
    if jax.process_index() == 0:  # under jit every process computes, the first one writes
      from etils import epath  # pylint: disable=g-import-not-at-top
      epath.Path(self.out_dir).mkdir(parents=True, exist_ok=True)
      visualize.save_png(f'{self.out_dir}/step_{step:07d}.png', picture)
    return float(loss), picture


def heldout_images(config: ml_collections.ConfigDict, image_size: int) -> np.ndarray:
  """`num_visualize` fixed eval-split images (centre crops), spread over the whole split.

  `pipeline.spread_examples` spaces them evenly over the split with an offset drawn from
  `config.seed`: the same images in every run and resume, from classes all over a split
  sorted by class (an ImageFolder), and only those are decoded.
  """
  ds = config.dataset
  return pipeline.spread_examples(ds, split=ds.eval_split, count=config.num_visualize,
                                  image_size=image_size, seed=config.seed)['image']
