"""mae_jax: Masked Autoencoders (He et al.) in JAX/Flax."""
from mae_jax.mae import MaskedAutoencoder, mae_loss, normalize_patches
from mae_jax.masking import random_masking
from mae_jax.patches import patchify, unpatchify
from mae_jax.pos_embed import sincos_2d
from mae_jax.vit import Encoder

__version__ = '0.1.0'
__all__ = ['MaskedAutoencoder', 'Encoder', 'mae_loss', 'normalize_patches', 'random_masking',
           'patchify', 'unpatchify', 'sincos_2d']
