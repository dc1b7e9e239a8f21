"""The MAE model: patches, position tables, masking, loss, sizes, gradients and config errors.

Numerical parity with an independent implementation (Hugging Face ViTMAE) lives in
test_hf_parity.py; these tests check the invariants the reference defines.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import MaskedAutoencoder, mae_loss, patchify, random_masking, sincos_2d, unpatchify
from mae_jax.model import presets
from mae_jax.model.masking import num_kept

TINY = presets.model_config('tiny').to_dict()


@pytest.fixture(scope='module')
def tiny():
  model = MaskedAutoencoder(**TINY)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  init = jax.jit(lambda x: model.init({'params': jax.random.key(1), 'mask': jax.random.key(2)}, x))
  return model, init(images)['params'], images


# --- patches -------------------------------------------------------------------------------

def test_patchify_pixel_order_and_round_trip():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
  patches = patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  # Patch (row 1, col 1) = pixels [4:8, 4:8]; inside it pixels run row, column, channel.
  np.testing.assert_array_equal(patches[1, 1 * 2 + 1], images[1, 4:8, 4:8].reshape(-1))
  np.testing.assert_array_equal(unpatchify(patches, 4, grid=(3, 2)), images)


def test_unpatchify_rejects_bad_shapes():
  with pytest.raises(ValueError, match='square grid'):
    unpatchify(jnp.zeros((1, 6, 48)), 4)
  with pytest.raises(ValueError, match='patch_size'):
    patchify(jnp.zeros((1, 10, 10, 3)), 4)


# --- position tables -----------------------------------------------------------------------

def test_sincos_table_against_elementwise_definition():
  d, rows, cols = 16, 3, 5
  table = sincos_2d(d, (rows, cols), cls_token=True)
  assert table.shape == (1 + rows * cols, d) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0], 0.0)
  quarter = d // 4
  for r in range(rows):
    for c in range(cols):
      row = table[1 + r * cols + c]
      for j in range(quarter):
        omega = 1.0 / 10000 ** (j / quarter)
        # First half: column index, sines then cosines; second half: row index.
        assert math.isclose(row[j], math.sin(c * omega), abs_tol=1e-6)
        assert math.isclose(row[quarter + j], math.cos(c * omega), abs_tol=1e-6)
        assert math.isclose(row[2 * quarter + j], math.sin(r * omega), abs_tol=1e-6)
        assert math.isclose(row[3 * quarter + j], math.cos(r * omega), abs_tol=1e-6)


# --- masking -------------------------------------------------------------------------------

def test_masking_invariants():
  b, length, ratio = 16, 64, 0.75
  m = random_masking(b, length, ratio, rng=jax.random.key(0))
  keep = num_kept(length, ratio)
  assert keep == 16 and m.ids_keep.shape == (b, keep)
  np.testing.assert_array_equal(m.mask.sum(1), length - keep)
  # ids_restore inverts the shuffle, and the kept ids are exactly the unmasked patches.
  shuffle = np.concatenate([np.asarray(m.ids_keep), np.argsort(np.asarray(m.ids_restore))[:, keep:]], 1)
  np.testing.assert_array_equal(np.take_along_axis(shuffle, np.asarray(m.ids_restore), 1),
                                np.tile(np.arange(length), (b, 1)))
  for i in range(b):
    assert set(np.asarray(m.ids_keep[i])) == set(np.flatnonzero(np.asarray(m.mask[i]) == 0))
  # Every example gets its own mask.
  assert len({tuple(np.asarray(row)) for row in m.mask}) == b


def test_masks_do_not_depend_on_how_the_batch_is_split():
  key, ids = jax.random.key(7), jnp.arange(100, 112)
  whole = random_masking(12, 49, 0.75, rng=key, example_ids=ids).mask
  parts = [random_masking(4, 49, 0.75, rng=key, example_ids=ids[i:i + 4]).mask for i in (0, 4, 8)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))
  again = random_masking(12, 49, 0.75, rng=key, example_ids=ids).mask
  np.testing.assert_array_equal(whole, again)
  other = random_masking(12, 49, 0.75, rng=jax.random.key(8), example_ids=ids).mask
  assert not np.array_equal(whole, other)


def test_noise_reproduces_reference_argsort():
  noise = jax.random.uniform(jax.random.key(3), (3, 10))
  m = random_masking(3, 10, 0.6, noise=noise)
  keep = int(10 * (1 - 0.6))
  expected_keep = np.argsort(np.asarray(noise), axis=1)[:, :keep]
  np.testing.assert_array_equal(m.ids_keep, expected_keep)
  np.testing.assert_array_equal(m.ids_restore, np.argsort(np.argsort(np.asarray(noise), 1), 1))


# --- loss ----------------------------------------------------------------------------------

def test_loss_counts_removed_patches_only():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  target = np.asarray(patchify(images, 4))
  mask = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
  pred = target + 1000.0 * (1 - mask)[..., None]  # wrong only where patches were kept
  pred[mask == 1] += 0.5  # off by 0.5 on every removed pixel
  assert float(mae_loss(images, pred, mask, 4)) == pytest.approx(0.25, rel=1e-6)


def test_norm_pix_loss_uses_unbiased_variance():
  torch = pytest.importorskip('torch', reason='torch provides the independent var(); pip install .[test]')
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32) * 3 + 1
  pred = rng.normal(size=(2, 4, 48)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32)
  t = torch.from_numpy(np.asarray(patchify(images, 4)))
  t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5  # torch var is ddof=1
  per_patch = ((torch.from_numpy(pred) - t) ** 2).mean(-1)
  expected = float((per_patch * torch.from_numpy(mask)).sum() / mask.sum())
  got = float(mae_loss(images, pred, mask, 4, norm_pix_loss=True))
  assert got == pytest.approx(expected, rel=1e-5)
  biased = float(mae_loss(images, pred, mask, 4, norm_pix_loss=False))
  assert got != pytest.approx(biased, rel=1e-3)


# --- model ---------------------------------------------------------------------------------

def test_forward_shapes_and_mask(tiny):
  model, params, images = tiny
  apply = jax.jit(lambda p, x, key, ratio: model.apply({'params': p}, x, mask_ratio=ratio,
                                                       rngs={'mask': key}), static_argnums=3)
  loss, pred, mask = apply(params, images, jax.random.key(0), 0.75)
  assert pred.shape == (4, 64, 48) and mask.shape == (4, 64)
  np.testing.assert_array_equal(mask.sum(1), 48)
  assert np.isfinite(float(loss))
  _, _, mask_half = apply(params, images, jax.random.key(0), 0.5)
  np.testing.assert_array_equal(mask_half.sum(1), 32)


def test_every_learnable_param_gets_a_finite_nonzero_gradient(tiny):
  model, params, images = tiny
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  assert not any('pos_embed' in n for n in names), 'position tables must be fixed, not params'

  def loss_fn(p):
    return model.apply({'params': p}, images, rngs={'mask': jax.random.key(5)})[0]

  grads = jax.jit(jax.grad(loss_fn))(params)
  for name, (_, g) in zip(names, jax.tree_util.tree_flatten_with_path(grads)[0]):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), f'{name} gets no gradient'


def test_remat_changes_neither_params_nor_results(tiny):
  """Rematerialised blocks (config.remat) have the same params, loss and gradients; the
  compiled backward pass really recomputes (more instructions, less temporary memory)."""
  model, params, images = tiny
  remat = MaskedAutoencoder(**TINY, remat=True)
  shapes = jax.eval_shape(remat.init, {'params': jax.random.key(1), 'mask': jax.random.key(2)},
                          images)['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(params)

  def grad_fn(m):
    return jax.jit(jax.value_and_grad(
        lambda p: m.apply({'params': p}, images, rngs={'mask': jax.random.key(5)})[0]))

  (loss, grads), (loss_r, grads_r) = grad_fn(model)(params), grad_fn(remat)(params)
  assert float(loss) == pytest.approx(float(loss_r), rel=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-7)
  hlo = [grad_fn(m).lower(params).compile().as_text() for m in (model, remat)]
  assert hlo[1].count(' dot(') > hlo[0].count(' dot(')  # forward matmuls done again


def test_mask_token_in_encoder_baseline():
  model = MaskedAutoencoder(**{**TINY, 'mask_token_in_encoder': True})
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = jax.jit(model.init)({'params': jax.random.key(1), 'mask': jax.random.key(2)}, images)['params']
  assert 'mask_token' in params['encoder'] and 'mask_token' not in params['decoder']
  grads = jax.jit(jax.grad(
      lambda p: model.apply({'params': p}, images, rngs={'mask': jax.random.key(3)})[0]))(params)
  assert np.any(np.asarray(grads['encoder']['mask_token']) != 0)
  # The encoder sees all 64 patches plus cls rather than 16 + cls.
  seen = jax.eval_shape(
      lambda p: model.apply({'params': p}, images, rngs={'mask': jax.random.key(3)},
                            method=lambda m, x: m.encoder(x, m.mask(x.shape[0]))), params)
  assert seen.shape == (2, 65, 64)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _vit_block(d: int) -> int:
  # qkv, proj, fc1, fc2 (weights + biases) and two LayerNorms.
  return (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d


def _expected_sizes(d, depth, p, dd=512, d_depth=8):
  encoder = p * p * 3 * d + d + d + depth * _vit_block(d) + 2 * d  # patch embed, cls, blocks, norm
  decoder = d * dd + dd + dd + d_depth * _vit_block(dd) + 2 * dd + dd * p * p * 3 + p * p * 3
  return encoder, encoder + decoder


@pytest.mark.parametrize('name,dims,paper_m', [
    ('vit_b', (768, 12, 16), 86), ('vit_l', (1024, 24, 16), 304), ('vit_h', (1280, 32, 14), 632)])
def test_paper_sizes_through_eval_shape(name, dims, paper_m):
  cfg = presets.model_config(name).to_dict()
  model = MaskedAutoencoder(**cfg)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, x), images)
  params = shapes['params']
  encoder, total = _expected_sizes(*dims)
  assert _count(params['encoder']) == encoder
  assert _count(params) == total
  # The paper's 86M / 304M / 632M also count the fixed position table (not a param here).
  assert (encoder + (1 + (224 // dims[2]) ** 2) * dims[0]) / 1e6 == pytest.approx(paper_m, rel=0.005)


@pytest.mark.parametrize('overrides,field', [
    ({'img_size': 30}, 'img_size'),
    ({'embed_dim': 66, 'num_heads': 4}, 'embed_dim'),
    ({'decoder_num_heads': 5}, 'decoder_embed_dim'),
    ({'mask_ratio': 1.0}, 'mask_ratio'),
    ({'mask_ratio': -0.1}, 'mask_ratio'),
])
def test_bad_config_fails_at_construction(overrides, field):
  with pytest.raises(ValueError, match=field):
    MaskedAutoencoder(**{**TINY, **overrides})


def test_bad_call_arguments(tiny):
  model, params, images = tiny
  with pytest.raises(ValueError, match='mask_ratio'):
    model.apply({'params': params}, images, mask_ratio=1.0, rngs={'mask': jax.random.key(0)})
  with pytest.raises(ValueError, match='img_size'):
    model.apply({'params': params}, images[:, :16], rngs={'mask': jax.random.key(0)})
  with pytest.raises(ValueError, match='noise'):
    model.apply({'params': params}, images, noise=jnp.zeros((4, 10)))
  with pytest.raises(TypeError):
    MaskedAutoencoder(**{**TINY, 'unknown_field': 1})
