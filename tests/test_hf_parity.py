"""Numerical parity with an independent implementation: Hugging Face `ViTMAEForPreTraining`.

A tiny HF model with random weights is converted into mae_jax params by `mae_jax.convert`;
both models get the same images and the same `noise` (the uniform noise the reference
argsorts), so masks, predictions, losses and the loss gradients must agree.

transformers 5.x builds a model with all-zero position tables, cls token and mask token, and
unit LayerNorms with zero biases; the fixture fills the tables with HF's own sin-cos code
(`initialize_weights`), draws the tokens, and perturbs every bias and LayerNorm so that
nothing compares zeros or ones.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the HF parity test needs torch (pip install .[test])')
transformers = pytest.importorskip(
    'transformers', reason='the HF parity test needs transformers (pip install .[test])')
from transformers.models.vit_mae import modeling_vit_mae as hf_vit_mae  # noqa: E402

from mae_jax import MaskedAutoencoder, convert, sincos_2d  # noqa: E402
from mae_jax.model import masking  # noqa: E402

BATCH = 3
HF_CONFIG = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32,
                 decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=128, layer_norm_eps=1e-6, hidden_act='gelu',
                 qkv_bias=True, mask_ratio=0.75, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
NUM_PATCHES = (32 // 4) ** 2
RTOL = 1e-5


def build_hf_model(seed: int = 0, **overrides):
  """A random tiny HF ViTMAE with filled position tables, random tokens, perturbed biases/norms."""
  torch.manual_seed(seed)
  config = transformers.ViTMAEConfig(**{**HF_CONFIG, **overrides})
  config._attn_implementation = 'eager'
  model = transformers.ViTMAEForPreTraining(config).eval()
  embeddings = model.vit.embeddings
  # post_init marks the conv as initialised, which makes initialize_weights a no-op.
  if hasattr(embeddings.patch_embeddings.projection, '_is_hf_initialized'):
    del embeddings.patch_embeddings.projection._is_hf_initialized
  embeddings.initialize_weights()  # HF's sin-cos table, xavier conv, N(0, 0.02) cls token
  model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'layernorm' in name:
        param.add_(0.2 * torch.randn_like(param))
      if name.endswith(('cls_token', 'mask_token')):
        param.normal_(0.0, 0.5)
  return model


def hf_numpy_state(named_tensors):
  return {name: t.detach().cpu().numpy() for name, t in named_tensors}


@pytest.fixture(scope='module')
def setup():
  hf = build_hf_model()
  state = hf_numpy_state(hf.state_dict().items())
  converted = convert.from_state_dict(state, num_heads=4, decoder_num_heads=4)
  gen = torch.Generator().manual_seed(1)
  images = torch.randn(BATCH, 3, 32, 32, generator=gen)
  noise = torch.rand(BATCH, NUM_PATCHES, generator=gen)
  return dict(hf=hf, state=state, converted=converted, images=images, noise=noise)


def run_hf(hf, images, noise, norm_pix_loss, mask_ratio=0.75):
  hf.config.norm_pix_loss = norm_pix_loss
  hf.config.mask_ratio = mask_ratio
  hf.zero_grad()
  out = hf(pixel_values=images, noise=noise)
  out.loss.backward()
  grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
  return out, grads


def run_mae_jax(converted, images, noise, norm_pix_loss, mask_ratio=0.75):
  model = MaskedAutoencoder(**dict(converted.model_config, norm_pix_loss=norm_pix_loss))
  nhwc = jnp.asarray(images.permute(0, 2, 3, 1).numpy())

  def loss_fn(params):
    loss, pred, mask = model.apply({'params': params}, nhwc, mask_ratio=mask_ratio,
                                   noise=jnp.asarray(noise.numpy()))
    return loss, (pred, mask)

  (loss, (pred, mask)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      converted.params)
  return float(loss), np.asarray(pred), np.asarray(mask), grads


def assert_close(actual, expected, what):
  expected = np.asarray(expected, np.float64)
  scale = float(np.max(np.abs(expected)))
  assert scale > 0, f'{what}: the reference is all zeros, the comparison would prove nothing'
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL,
                             atol=RTOL * scale, err_msg=what)


def test_converter_reads_hf_model_as_full_checkpoint(setup):
  converted = setup['converted']
  assert converted.kind == 'full' and converted.layout == 'hf'
  cfg = converted.model_config
  assert (cfg['embed_dim'], cfg['depth'], cfg['decoder_embed_dim'], cfg['decoder_depth'],
          cfg['img_size'], cfg['patch_size'], cfg['mlp_ratio']) == (64, 2, 32, 2, 32, 4, 4.0)
  # The tables HF's own code filled in equal mae_jax's tables.
  assert converted.pos_embed_max_diff == {'pos_embed': 0.0, 'decoder_pos_embed': 0.0}


def test_sincos_tables_equal_hf_tables(setup):
  hf = setup['hf']
  np.testing.assert_array_equal(
      hf.vit.embeddings.position_embeddings.detach().numpy()[0], sincos_2d(64, 8, cls_token=True))
  np.testing.assert_array_equal(
      hf.decoder.decoder_pos_embed.detach().numpy()[0], sincos_2d(32, 8, cls_token=True))
  # On a non-square grid too: HF builds [sin_h|cos_h|sin_w|cos_w] and swaps the halves into the
  # release's layout (first half = column index), which mae_jax computes directly.
  rows, cols, width = 3, 5, 16
  table = hf_vit_mae.build_2d_sinusoidal_position_embedding(rows, cols, width, cls_token=True)
  table = torch.cat([table[:, width // 2:], table[:, :width // 2]], dim=-1)
  np.testing.assert_allclose(table.numpy(), sincos_2d(width, (rows, cols), cls_token=True),
                             rtol=0, atol=1e-7)


# mask_ratio 0.6 keeps int(64 * 0.4) = int(25.6) = 25 patches: a kept count that is not exact.
@pytest.mark.parametrize('norm_pix_loss,mask_ratio', [(False, 0.75), (True, 0.6)])
def test_loss_pred_mask_and_gradients_match_hf(setup, norm_pix_loss, mask_ratio):
  out, hf_grads = run_hf(setup['hf'], setup['images'], setup['noise'], norm_pix_loss, mask_ratio)
  loss, pred, mask, grads = run_mae_jax(setup['converted'], setup['images'], setup['noise'],
                                        norm_pix_loss, mask_ratio)
  kept = int(NUM_PATCHES * (1 - mask_ratio))
  assert kept == {0.75: 16, 0.6: 25}[mask_ratio]
  np.testing.assert_array_equal(mask, out.mask.numpy())
  assert (mask == 0).sum(axis=1).tolist() == [kept] * BATCH
  ours = masking.random_masking(BATCH, NUM_PATCHES, mask_ratio,
                                noise=jnp.asarray(setup['noise'].numpy()))
  np.testing.assert_array_equal(np.asarray(ours.ids_restore), out.ids_restore.numpy())
  np.testing.assert_array_equal(np.asarray(ours.mask), mask)
  assert_close(pred, out.logits.detach().numpy(), 'pred')
  assert_close(loss, out.loss.item(), 'loss')
  # Torch gradients go through the same name mapping as the weights (q/k/v rows fused).
  official, _ = convert.to_official(hf_numpy_state(hf_grads.items()))
  mapped = convert.official_to_params(official)
  flat_jax = convert.flatten(grads)
  flat_torch = convert.flatten(mapped)
  assert set(flat_jax) == set(flat_torch)
  for path, grad in flat_torch.items():
    assert_close(flat_jax[path], grad, 'grad ' + '/'.join(path))


def test_gelu_equals_torch_exact_gelu_and_its_gradient():
  """The MLP's erf GELU against torch's exact GELU, values and derivatives, over the range
  activations take (and the tails, where an erf form could lose accuracy)."""
  from mae_jax.model import vit  # pylint: disable=g-import-not-at-top
  x = np.concatenate([np.linspace(-12, 12, 20001), np.random.default_rng(0).normal(0, 3, 5000)]
                     ).astype(np.float32)
  tx = torch.tensor(x, requires_grad=True)
  ty = torch.nn.functional.gelu(tx)
  ty.sum().backward()
  y, vjp = jax.vjp(vit.gelu, jnp.asarray(x))
  (dx,) = vjp(jnp.ones_like(y))
  np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.gelu(x, approximate=False)),
                             rtol=1e-6, atol=1e-6)
