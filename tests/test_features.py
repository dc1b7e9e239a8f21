"""`mae_jax.features`: pooled features of a pretrained encoder on unmasked images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
from mae_jax import MaskedAutoencoder
from mae_jax.model import masking, presets
from mae_jax.model.vit import Encoder

TINY = presets.model_config('tiny').to_dict()


@pytest.fixture(scope='module')
def pretrained():
  model = MaskedAutoencoder(**TINY)
  images = np.asarray(jax.random.normal(jax.random.key(0), (11, 32, 32, 3)), np.float32)
  params = jax.jit(model.init)({'params': jax.random.key(1), 'mask': jax.random.key(2)},
                               images[:1])['params']
  return model, params, images


def _by_hand(params, image):
  """One image at a time through the encoder module, as a user would call it."""
  encoder = Encoder(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
  tokens = encoder.apply({'params': params['encoder']}, image[None])[0]
  return np.asarray(tokens[0]), np.asarray(tokens[1:].mean(0))


def test_features_equal_the_encoder_called_by_hand(pretrained):
  _, params, images = pretrained
  # 11 images in calls of 8 over the 8 simulated devices: the last call is padded.
  feats = mae_jax.features(params, images, TINY, batch_size=8)
  assert set(feats) == {'cls', 'mean'}
  for i, image in enumerate(images):
    cls, mean = _by_hand(params, image)
    np.testing.assert_allclose(feats['cls'][i], cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats['mean'][i], mean, rtol=1e-5, atol=1e-5)
  assert feats['cls'].dtype == np.float32 and feats['cls'].shape == (11, 64)
  assert not np.allclose(feats['cls'][0], feats['cls'][1])


def test_features_match_the_mae_encoder_on_all_patches_shuffled(pretrained):
  """MAE's own encoder path with nothing removed (the patches come shuffled): the cls token
  and the mean of the patch tokens do not depend on the token order."""
  model, params, images = pretrained
  masks = masking.random_masking(len(images), 64, 0.0, rng=jax.random.key(3))
  tokens = model.apply({'params': params}, jnp.asarray(images), masks,
                       method=lambda m, x, k: m.encoder(x, k))
  feats = mae_jax.features(params, images, TINY)
  np.testing.assert_allclose(feats['cls'], tokens[:, 0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(feats['mean'], tokens[:, 1:].mean(1), rtol=1e-4, atol=1e-5)


def test_features_take_an_encoder_tree_and_a_single_pool(pretrained):
  _, params, images = pretrained
  both = mae_jax.features(params, images, TINY)
  cls = mae_jax.features(params['encoder'], images, TINY, pool='cls', batch_size=3)
  np.testing.assert_allclose(cls, both['cls'], rtol=1e-6, atol=1e-6)
  assert mae_jax.features(params, images[:0], TINY, pool=['mean'])['mean'].shape == (0, 64)


def test_features_bad_input(pretrained):
  _, params, images = pretrained
  with pytest.raises(ValueError, match=r'\(N, 32, 32, 3\)'):
    mae_jax.features(params, images[:, :16, :16], TINY)
  with pytest.raises(ValueError, match='choose from'):
    mae_jax.features(params, images, TINY, pool='max')
  with pytest.raises(ValueError, match='no encoder'):
    mae_jax.features({'decoder': params['decoder']}, images, TINY)
