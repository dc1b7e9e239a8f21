"""PyTorch checkpoint conversion: HF export, official-layout round trips, classifier logits
against an independent torch forward, encoder features against HF, the CLI, and bad input.

The official-layout state dicts are built from a Hugging Face model by the key mapping of
MAE.md section 7, written out here independently of mae_jax.convert.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='conversion tests need torch (pip install .[test])')
transformers = pytest.importorskip(
    'transformers', reason='conversion tests need transformers (pip install .[test])')
import torch.nn.functional as F  # noqa: E402

from mae_jax import convert  # noqa: E402
from mae_jax.io import checkpoint  # noqa: E402
from mae_jax.model import classifier  # noqa: E402
from test_hf_parity import build_hf_model, hf_numpy_state  # noqa: E402

NUM_CLASSES = 10
# The 'tiny' preset's sizes, so head counts come from the preset match.
TINY_HF = dict(decoder_num_hidden_layers=1)


def official_from_hf(hf_state):
  """MAE.md section 7's mapping, HF (transformers 5.x names) -> official, fused qkv."""
  out = {
      'cls_token': hf_state['vit.embeddings.cls_token'],
      'pos_embed': hf_state['vit.embeddings.position_embeddings'],
      'patch_embed.proj.weight': hf_state['vit.embeddings.patch_embeddings.projection.weight'],
      'patch_embed.proj.bias': hf_state['vit.embeddings.patch_embeddings.projection.bias'],
  }

  def blocks(hf_prefix, prefix):
    i = 0
    while f'{hf_prefix}.{i}.layernorm_before.weight' in hf_state:
      src, dst = f'{hf_prefix}.{i}', f'{prefix}.{i}'
      for leaf in ('weight', 'bias'):
        out[f'{dst}.norm1.{leaf}'] = hf_state[f'{src}.layernorm_before.{leaf}']
        out[f'{dst}.attn.qkv.{leaf}'] = np.concatenate(
            [hf_state[f'{src}.attention.{n}_proj.{leaf}'] for n in 'qkv'], axis=0)
        out[f'{dst}.attn.proj.{leaf}'] = hf_state[f'{src}.attention.o_proj.{leaf}']
        out[f'{dst}.norm2.{leaf}'] = hf_state[f'{src}.layernorm_after.{leaf}']
        out[f'{dst}.mlp.fc1.{leaf}'] = hf_state[f'{src}.mlp.fc1.{leaf}']
        out[f'{dst}.mlp.fc2.{leaf}'] = hf_state[f'{src}.mlp.fc2.{leaf}']
      i += 1

  blocks('vit.layers', 'blocks')
  for leaf in ('weight', 'bias'):
    out[f'norm.{leaf}'] = hf_state[f'vit.layernorm.{leaf}']
  out['mask_token'] = hf_state['decoder.mask_token']
  out['decoder_pos_embed'] = hf_state['decoder.decoder_pos_embed']
  for leaf in ('weight', 'bias'):
    out[f'decoder_embed.{leaf}'] = hf_state[f'decoder.decoder_embed.{leaf}']
  blocks('decoder.decoder_layers', 'decoder_blocks')
  for name in ('decoder_norm', 'decoder_pred'):
    for leaf in ('weight', 'bias'):
      out[f'{name}.{leaf}'] = hf_state[f'decoder.{name}.{leaf}']
  return out


def encoder_only(official):
  return {k: v for k, v in official.items() if not k.startswith(('decoder_', 'mask_token'))}


def finetuned(official, seed=0):
  """A global-pool fine-tuned classifier's layout: no norm, fc_norm + head, learned pos_embed."""
  rng = np.random.default_rng(seed)
  out = {k: v for k, v in encoder_only(official).items() if not k.startswith('norm.')}
  d = out['cls_token'].shape[-1]
  out['pos_embed'] = out['pos_embed'] + rng.normal(0, 0.1, out['pos_embed'].shape).astype('f4')
  out['fc_norm.weight'] = (1 + rng.normal(0, 0.2, d)).astype('f4')
  out['fc_norm.bias'] = rng.normal(0, 0.2, d).astype('f4')
  out['head.weight'] = rng.normal(0, 0.2, (NUM_CLASSES, d)).astype('f4')
  out['head.bias'] = rng.normal(0, 0.2, NUM_CLASSES).astype('f4')
  return out


def assert_same_state(actual, expected):
  assert list(actual) == list(expected) or set(actual) == set(expected), (
      sorted(set(actual) ^ set(expected)))
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(actual[key]), value, err_msg=key)


@pytest.fixture(scope='module')
def hf():
  model = build_hf_model(seed=3, **TINY_HF)
  state = hf_numpy_state(model.state_dict().items())
  gen = torch.Generator().manual_seed(5)
  images = torch.randn(2, 3, 32, 32, generator=gen)
  noise = torch.rand(2, 64, generator=gen)
  with torch.no_grad():
    loss = model(pixel_values=images, noise=noise).loss
  return dict(model=model, state=state, official=official_from_hf(state), images=images,
              noise=noise, loss=loss)


# --- Hugging Face export -----------------------------------------------------------------------

def test_hf_export_loads_strictly_and_gives_the_same_loss(hf):
  converted = convert.from_state_dict(hf['state'])
  assert (converted.model_config['num_heads'], converted.model_config['decoder_num_heads']) == (4, 4)
  exported = convert.to_state_dict(converted.params, converted.model_config, 'hf')
  fresh = build_hf_model(seed=99, **TINY_HF)  # other weights; all must be overwritten
  result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                                 strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  with torch.no_grad():
    loss = fresh(pixel_values=hf['images'], noise=hf['noise']).loss
  assert torch.equal(loss, hf['loss'])
  assert_same_state(exported, hf['state'])
  # An encoder alone is named as a ViTMAEModel (no `vit.` prefix).
  encoder = convert.to_state_dict({'encoder': converted.params['encoder']},
                                  converted.model_config, 'hf')
  result = fresh.vit.load_state_dict({k: torch.from_numpy(v) for k, v in encoder.items()},
                                     strict=True)
  assert not result.missing_keys and not result.unexpected_keys


def test_hf_classic_names_load_through_transformers_renaming(hf, tmp_path):
  """Hub files use the classic names; transformers renames them on load, and so do we."""
  converted = convert.from_state_dict(hf['state'])
  classic = convert.to_state_dict(converted.params, converted.model_config, 'hf_classic')
  assert 'vit.encoder.layer.0.attention.attention.query.weight' in classic
  assert 'decoder.decoder_layers.0.intermediate.dense.weight' in classic
  back = convert.from_state_dict(classic)
  assert back.layout == 'hf_classic'
  jax.tree.map(np.testing.assert_array_equal, back.params, converted.params)
  hf['model'].config.save_pretrained(tmp_path)
  convert.write_state_dict(str(tmp_path / 'model.safetensors'), classic, 'hf_classic')
  assert_same_state(convert.read_state_dict(str(tmp_path / 'model.safetensors')), classic)
  loaded, info = transformers.ViTMAEForPreTraining.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    loss = loaded.eval()(pixel_values=hf['images'], noise=hf['noise']).loss
  assert torch.equal(loss, hf['loss'])


# --- official layouts ----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['pretrain', 'full', 'classifier'])
def test_official_layouts_round_trip_exactly(hf, kind):
  official = {'full': hf['official'], 'pretrain': encoder_only(hf['official']),
              'classifier': finetuned(hf['official'])}[kind]
  converted = convert.from_state_dict(official)
  assert (converted.kind, converted.layout) == (kind, 'official')
  from_hf = convert.from_state_dict(hf['state']).params
  if kind == 'classifier':
    assert sorted(converted.params) == ['encoder', 'fc_norm', 'head']
    assert 'norm' not in converted.params['encoder']
    np.testing.assert_array_equal(converted.params['encoder']['pos_embed'], official['pos_embed'])
    assert converted.pos_embed_max_diff['pos_embed'] > 0.1  # learned, kept, reported
    assert converted.model_config['classifier']['num_classes'] == NUM_CLASSES
  else:
    # The same tensors as through the HF naming, and the tables are mae_jax's own.
    expected = from_hf if kind == 'full' else {'encoder': from_hf['encoder']}
    jax.tree.map(np.testing.assert_array_equal, converted.params, expected)
    assert max(converted.pos_embed_max_diff.values()) == 0.0
  qkv = converted.params['encoder']['blocks_1']['attn']['qkv']['kernel']
  np.testing.assert_array_equal(qkv, official['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(converted.params['encoder']['patch_embed']['kernel'],
                                official['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  assert_same_state(convert.to_state_dict(converted.params, converted.model_config), official)


def timm_vit_logits(sd, images, num_heads, eps=1e-6):
  """A timm-style global-pool ViT classifier (MAE's models_vit) written directly in torch."""
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  w = t['patch_embed.proj.weight']
  x = F.conv2d(images, w, t['patch_embed.proj.bias'], stride=w.shape[-1]).flatten(2).transpose(1, 2)
  b, n, d = x.shape
  x = torch.cat([t['cls_token'].expand(b, -1, -1), x], dim=1) + t['pos_embed']
  i = 0
  while f'blocks.{i}.norm1.weight' in t:
    p = f'blocks.{i}.'
    y = F.layer_norm(x, (d,), t[p + 'norm1.weight'], t[p + 'norm1.bias'], eps)
    qkv = F.linear(y, t[p + 'attn.qkv.weight'], t[p + 'attn.qkv.bias'])
    q, k, v = qkv.reshape(b, n + 1, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n + 1, d)
    x = x + F.linear(y, t[p + 'attn.proj.weight'], t[p + 'attn.proj.bias'])
    y = F.layer_norm(x, (d,), t[p + 'norm2.weight'], t[p + 'norm2.bias'], eps)
    y = F.linear(F.gelu(F.linear(y, t[p + 'mlp.fc1.weight'], t[p + 'mlp.fc1.bias'])),
                 t[p + 'mlp.fc2.weight'], t[p + 'mlp.fc2.bias'])
    x = x + y
    i += 1
  x = F.layer_norm(x[:, 1:].mean(dim=1), (d,), t['fc_norm.weight'], t['fc_norm.bias'], eps)
  return F.linear(x, t['head.weight'], t['head.bias'])


def test_finetuned_classifier_logits_match_a_torch_vit(hf):
  official = finetuned(hf['official'], seed=1)
  converted = convert.from_state_dict(official)
  record = converted.model_config['classifier']
  assert record['global_pool'] and record['num_classes'] == NUM_CLASSES
  model = classifier.classifier_from_config(converted.model_config, record['num_classes'],
                                            global_pool=record['global_pool'])
  nhwc = jnp.asarray(hf['images'].permute(0, 2, 3, 1).numpy())
  logits = jax.jit(lambda p: model.apply({'params': p}, nhwc))(converted.params)
  with torch.no_grad():
    expected = timm_vit_logits(official, hf['images'], converted.model_config['num_heads'])
  assert float(expected.abs().max()) > 0.1
  np.testing.assert_allclose(np.asarray(logits), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_converted_encoder_gives_hf_features_through_the_classifier_path(hf):
  """An encoder-only release loaded by the downstream jobs: cls features equal HF's encoder
  output on all patches (mask_ratio 0, identity shuffle)."""
  converted = convert.from_state_dict(encoder_only(hf['official']))
  cfg = converted.model_config
  model = classifier.classifier_from_config(cfg, cfg['embed_dim'], global_pool=False)
  nhwc = jnp.asarray(hf['images'].permute(0, 2, 3, 1).numpy())
  # Every param is loaded or set below, so shapes suffice (a real init is slow on CPU).
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), nhwc))['params']
  params = classifier.load_pretrained_encoder(abstract, converted.params, cfg, model.grid,
                                              model.patch_size)
  # An identity head makes the logits the features themselves.
  params['head'] = {'kernel': jnp.eye(cfg['embed_dim']), 'bias': jnp.zeros(cfg['embed_dim'])}
  features = jax.jit(lambda p: model.apply({'params': p}, nhwc))(params)
  vit = hf['model'].vit
  vit.config.mask_ratio = 0.0
  with torch.no_grad():
    out = vit(pixel_values=hf['images'], noise=torch.arange(64.0).expand(2, 64))
  np.testing.assert_allclose(np.asarray(features), out.last_hidden_state[:, 0].numpy(),
                             rtol=1e-5, atol=1e-5)
  hf['model'].config.mask_ratio = 0.75


# --- files and the command line ------------------------------------------------------------------

def test_cli_round_trip_through_an_orbax_checkpoint(hf, tmp_path, capsys):
  src = tmp_path / 'mae_visualize_tiny.pth'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in hf['official'].items()}}, src)
  ckpt = tmp_path / 'ckpt'
  assert convert.main(['--input', str(src), '--output', str(ckpt)]) == 0
  assert 'full checkpoint (official naming' in capsys.readouterr().out
  params, model_config = checkpoint.load_params(str(ckpt))
  direct = convert.from_state_dict(hf['official'])
  jax.tree.map(np.testing.assert_array_equal, params, direct.params)
  assert model_config == checkpoint._json_normalise(direct.model_config)  # pylint: disable=protected-access
  back = tmp_path / 'back.pth'
  assert convert.main(['--input', str(ckpt), '--output', str(back)]) == 0
  assert_same_state(torch.load(back, weights_only=True)['model'], hf['official'])
  back_hf = tmp_path / 'back_hf.pth'
  assert convert.main(['--input', str(ckpt), '--output', str(back_hf), '--format', 'hf']) == 0
  assert_same_state(torch.load(back_hf, weights_only=True), hf['state'])
  # Nothing already saved is overwritten.
  before = back.read_bytes()
  assert convert.main(['--input', str(ckpt), '--output', str(back)]) == 2
  assert 'already exists' in capsys.readouterr().err
  assert back.read_bytes() == before


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
  target = tmp_path / 'pwned'

  class Payload:
    def __reduce__(self):
      return (open, (str(target), 'w'))

  evil = tmp_path / 'evil.pth'
  torch.save({'model': {'cls_token': torch.zeros(1, 1, 8)}, 'x': Payload()}, evil)
  with pytest.raises(convert.ConversionError, match='refused.*run code'):
    convert.read_state_dict(str(evil))
  assert convert.main(['--input', str(evil), '--output', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'refused' in err
  assert not target.exists()
  assert not (tmp_path / 'out').exists()
  # The payload is live: an unsafe load would have run it.
  torch.load(evil, weights_only=False)
  assert target.exists()


def test_training_checkpoint_with_argparse_namespace_is_read(hf, tmp_path):
  import argparse  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'checkpoint-1599.pth'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in hf['official'].items()},
              'epoch': 1599, 'args': argparse.Namespace(model='mae_vit_tiny', norm_pix_loss=True)},
             path)
  assert_same_state(convert.read_state_dict(str(path)), hf['official'])


def test_file_that_is_not_a_checkpoint_gives_one_line(tmp_path, capsys):
  junk = tmp_path / 'notes.pth'
  junk.write_text('not a checkpoint at all\n')
  assert convert.main(['--input', str(junk), '--output', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'is not a PyTorch checkpoint' in err
  with pytest.raises(convert.ConversionError, match='holds no state dict'):
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    convert.read_state_dict(str(tmp_path / 'list.pth'))
  with pytest.raises(convert.ConversionError, match='does not exist'):
    convert.read_state_dict(str(tmp_path / 'missing.pth'))


# --- bad state dicts -----------------------------------------------------------------------------

def test_wrong_size_names_the_first_mismatching_key_and_both_shapes(hf):
  bad = dict(hf['official'])
  bad['blocks.1.mlp.fc1.weight'] = np.zeros((128, 64), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r'blocks\.1\.mlp\.fc1\.weight.*\(128, 64\).*expects \(256, 64\)'):
    convert.from_state_dict(bad)
  # A tiny checkpoint against the small_cpu model size.
  from mae_jax.model import presets  # pylint: disable=import-outside-toplevel
  with pytest.raises(convert.ConversionError,
                     match=r'cls_token.*\(1, 1, 64\).*expects \(1, 1, 128\)'):
    convert.from_state_dict(hf['official'], model_config=presets.model_config('small_cpu'))


def test_unknown_layout_and_unknown_keys_are_listed(hf):
  with pytest.raises(convert.ConversionError, match=r'Unknown checkpoint layout.*conv1\.weight'):
    convert.from_state_dict({'conv1.weight': np.zeros((8, 3, 3, 3)), 'fc.bias': np.zeros(8)})
  extra = dict(hf['official'], **{'head_dist.weight': np.zeros((3, 64)), 'foo': np.zeros(2)})
  with pytest.raises(convert.ConversionError, match=r"head_dist\.weight.*'foo'"):
    convert.from_state_dict(extra)
  hf_extra = dict(hf['state'], **{'vit.pooler.dense.weight': np.zeros((64, 64))})
  with pytest.raises(convert.ConversionError, match=r'vit\.pooler\.dense\.weight'):
    convert.from_state_dict(hf_extra)
  incomplete = {k: v for k, v in hf['state'].items() if 'layers.1.attention.k_proj' not in k}
  with pytest.raises(convert.ConversionError, match=r'blocks\.1\.attn\.qkv.*lacks the k part'):
    convert.from_state_dict(incomplete)


def test_position_tables_are_checked(hf):
  zeros = dict(hf['official'], decoder_pos_embed=np.zeros_like(hf['official']['decoder_pos_embed']))
  with pytest.raises(convert.ConversionError, match='decoder_pos_embed.*all zeros'):
    convert.from_state_dict(zeros)
  other = dict(hf['official'])
  other['pos_embed'] = other['pos_embed'][..., ::-1].copy()  # another layout of the table
  with pytest.raises(convert.ConversionError, match="pos_embed differs.*pos_embed='keep'"):
    convert.from_state_dict(other)
  with pytest.warns(UserWarning, match='pos_embed differs'):
    warned = convert.from_state_dict(other, pos_embed='warn')
  assert 'pos_embed' not in warned.params['encoder']
  kept = convert.from_state_dict(other, pos_embed='keep')
  np.testing.assert_array_equal(kept.params['encoder']['pos_embed'], other['pos_embed'])
  # A 224-pixel config cannot take a 32-pixel checkpoint's 8x8 table.
  with pytest.raises(convert.ConversionError, match=r'pos_embed.*img_size'):
    convert.from_state_dict(hf['official'], img_size=64)


def test_head_count_needs_a_preset_or_an_argument(hf):
  odd = {k: v for k, v in encoder_only(hf['official']).items() if not k.startswith('blocks.1.')}
  with pytest.raises(convert.ConversionError, match='--num-heads'):
    convert.from_state_dict(odd)
  assert convert.from_state_dict(odd, num_heads=8).model_config['num_heads'] == 8


def test_import_does_not_load_torch():
  code = ('import sys, mae_jax, mae_jax.convert, mae_jax.convert.__main__; '
          'assert "torch" not in sys.modules, "torch imported"; print("ok")')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False, timeout=120)
  assert result.stdout.strip() == 'ok', result.stderr
