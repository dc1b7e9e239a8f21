"""Downstream protocols: classifier, pos-table interpolation, layer decay, LARS, BN, steps, runs.

Tiny models on 32x32 synthetic images; 8 simulated devices (tests/conftest.py).
Independent references: torch's F.interpolate / BatchNorm1d, MAE's util/lars.py and
util/lr_decay.py transliterated to torch/Python below.
"""
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import jax_utils, traverse_util

from mae_jax.jobs import classification
from mae_jax.jobs import finetune
from mae_jax.jobs import layer_decay
from mae_jax.jobs import linear_probe
from mae_jax.model import classifier as classifier_lib
from mae_jax.model import presets
from mae_jax.model.pos_embed import sincos_2d

NUM_CLASSES = 10
NDEV = 8


def tiny_model_cfg(**overrides):
  return presets.model_config('tiny', **overrides)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(dict(tree)), sep='/')


def synthetic_batch(n=16, seed=0, size=32):
  rs = np.random.RandomState(seed)
  return {'image': rs.randn(n, size, size, 3).astype(np.float32),
          'label': rs.randint(0, NUM_CLASSES, n).astype(np.int32),
          'index': np.arange(n, dtype=np.int64) + 1000 * seed}


def shard(batch, n=NDEV):
  return jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


# --- Position tables -------------------------------------------------------------------------

@pytest.mark.parametrize('old,new', [((8, 8), (12, 12)), ((8, 8), (5, 5)), ((8, 8), (6, 10)),
                                     ((6, 4), (9, 7))])
def test_interpolate_pos_embed_matches_torch_bicubic(old, new):
  rs = np.random.RandomState(1)
  table = rs.randn(1, 1 + old[0] * old[1], 16).astype(np.float32)
  ours = classifier_lib.interpolate_pos_embed(table, new, old)
  patches = torch.from_numpy(table[:, 1:]).reshape(1, *old, 16).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(patches, size=new, mode='bicubic', align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 16).numpy()
  assert ours.shape == (1, 1 + new[0] * new[1], 16)
  np.testing.assert_array_equal(ours[:, :1], table[:, :1])  # cls row kept
  np.testing.assert_allclose(ours[:, 1:], ref, atol=2e-5)


def test_interpolate_pos_embed_same_size_is_identity():
  table = sincos_2d(64, 8, cls_token=True)[None]
  np.testing.assert_array_equal(classifier_lib.interpolate_pos_embed(table, (8, 8)), table)


# --- Classifier and loading ------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_mae_params():
  """An MAE pretraining tree: the encoder as pretraining builds it (fixed pos table)."""
  from mae_jax.model.vit import Encoder
  enc = Encoder(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
  params = jax.jit(enc.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))['params']
  return {'encoder': jax.device_get(params), 'decoder': {}}


def _jit_init(model, size=32):
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))


def test_classifier_takes_pretrained_encoder_and_interpolates(tiny_mae_params):
  cfg = tiny_model_cfg(img_size=48)
  model = classifier_lib.classifier_from_config(cfg, NUM_CLASSES, global_pool=True)
  params = jax.eval_shape(lambda: _jit_init(model, 48))['params']
  assert 'norm' not in params['encoder']  # global pool: the encoder's final norm is unused
  loaded = classifier_lib.load_pretrained_encoder(
      params, tiny_mae_params, dict(tiny_model_cfg()), model.grid, model.patch_size)
  got, src = flat(loaded['encoder']), flat(tiny_mae_params['encoder'])
  for key, value in got.items():
    if key != 'pos_embed':
      np.testing.assert_array_equal(value, src[key])
  expected_pos = classifier_lib.interpolate_pos_embed(sincos_2d(64, 8, cls_token=True)[None],
                                                      (12, 12))
  np.testing.assert_allclose(got['pos_embed'], expected_pos, atol=1e-6)


def test_stored_pos_table_is_used_and_interpolated(tiny_mae_params):
  """A converted PyTorch release stores its (learned or fixed) table: that table is used."""
  stored = np.random.RandomState(2).randn(1, 1 + 8 * 8, 64).astype(np.float32)
  ckpt = {'encoder': dict(tiny_mae_params['encoder'], pos_embed=stored)}
  model = classifier_lib.classifier_from_config(tiny_model_cfg(img_size=40), NUM_CLASSES,
                                                global_pool=True)
  params = jax.eval_shape(lambda: _jit_init(model, 40))['params']
  loaded = classifier_lib.load_pretrained_encoder(params, ckpt, None, model.grid,
                                                  model.patch_size)
  np.testing.assert_allclose(loaded['encoder']['pos_embed'],
                             classifier_lib.interpolate_pos_embed(stored, (10, 10)), atol=1e-6)
  np.testing.assert_array_equal(loaded['encoder']['pos_embed'][:, 0], stored[:, 0])


def test_classifier_matches_mae_encoder_features(tiny_mae_params):
  """cls-token mode at the pretraining size = the MAE encoder's normed cls token (unmasked)."""
  from mae_jax.model.vit import Encoder
  cfg = tiny_model_cfg()
  model = classifier_lib.classifier_from_config(cfg, NUM_CLASSES, global_pool=False)
  params = _jit_init(model)['params']
  params = classifier_lib.load_pretrained_encoder(params, tiny_mae_params, dict(cfg),
                                                  model.grid, model.patch_size)
  images = jnp.asarray(synthetic_batch(2)['image'])
  enc = Encoder(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
  tokens = jax.jit(enc.apply)({'params': tiny_mae_params['encoder']}, images)
  head = params['head']
  np.testing.assert_allclose(jax.jit(model.apply)({'params': params}, images),
                             tokens[:, 0] @ head['kernel'] + head['bias'], atol=1e-5)


def test_mismatched_checkpoint_names_param_and_shapes(tiny_mae_params):
  model = classifier_lib.classifier_from_config(tiny_model_cfg(embed_dim=32, num_heads=4),
                                                NUM_CLASSES, global_pool=True)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 32, 32, 3))))['params']
  with pytest.raises(ValueError, match=r'encoder/blocks_0/.*\(64, 192\).*\(32, 96\)|'
                                       r'encoder/.* has shape .* in .* but .* in the config'):
    classifier_lib.check_pretrained_encoder(abstract, tiny_mae_params, 'ckpt')
  deeper = classifier_lib.classifier_from_config(tiny_model_cfg(depth=1), NUM_CLASSES,
                                                 global_pool=True)
  abstract = jax.eval_shape(lambda: deeper.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 32, 32, 3))))['params']
  with pytest.raises(ValueError, match='encoder/blocks_1'):
    classifier_lib.check_pretrained_encoder(abstract, tiny_mae_params, 'ckpt')


# --- Layer-wise lr decay ---------------------------------------------------------------------

def _reference_layer_id(torch_name, num_layers):
  """MAE util/lr_decay.py get_layer_id_for_vit, verbatim logic."""
  if torch_name in ['cls_token', 'pos_embed']:
    return 0
  elif torch_name.startswith('patch_embed'):
    return 0
  elif torch_name.startswith('blocks'):
    return int(torch_name.split('.')[1]) + 1
  else:
    return num_layers


def _torch_name(path):
  """'encoder/blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.kernel' (official naming)."""
  parts = path.split('/')
  if parts[0] == 'encoder':
    parts = parts[1:]
  if parts[0].startswith('blocks_'):
    parts = ['blocks', parts[0][len('blocks_'):]] + parts[1:]
  return '.'.join(parts)


def test_layer_decay_scales_vit_b():
  cfg = presets.model_config('vit_b')
  model = classifier_lib.classifier_from_config(cfg, 1000, global_pool=True)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 224, 224, 3))))['params']
  scales = flat(layer_decay.layer_lr_scales(abstract, 12, 0.65))
  assert len(scales) == len(flat(abstract)) == 4 + 12 * 12 + 4
  for path, scale in scales.items():
    layer = _reference_layer_id(_torch_name(path), 13)
    assert scale == pytest.approx(0.65 ** (13 - layer), rel=1e-12), path
  assert scales['encoder/patch_embed/kernel'] == pytest.approx(0.65 ** 13)
  assert scales['encoder/blocks_11/mlp/fc2/bias'] == pytest.approx(0.65)
  assert scales['head/kernel'] == scales['fc_norm/scale'] == 1.0


def test_finetune_optimizer_applies_layer_scale_and_decay_mask(finetune_setup):
  _, params, config, _ = finetune_setup
  config = ml_collections.ConfigDict(dict(config.to_dict(), layer_decay=0.5))
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 1e-3, params)
  lr = 0.1
  tx = finetune.make_optimizer(config, lambda _: lr, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Plain torch-style AdamW first step: -lr * (sign(g) + wd * p) where decayed.
  up = flat(updates)
  for path, p in flat(params).items():
    scale = 0.5 ** (5 - _reference_layer_id(_torch_name(path), 5))
    name = path.split('/')[-1]
    decayed = p.ndim > 1 and name not in ('pos_embed', 'cls_token')
    adam = 1e-3 / (1e-3 + 1e-8)
    expected = -lr * scale * (adam + (0.05 * p if decayed else 0.0))
    np.testing.assert_allclose(up[path], expected, rtol=1e-5, atol=1e-9, err_msg=path)


# --- LARS ------------------------------------------------------------------------------------

class _ReferenceLARS(torch.optim.Optimizer):
  """MAE util/lars.py (MoCo v3), transliterated."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g['params']:
        dp = p.grad
        if p.ndim > 1:
          dp = dp.add(p, alpha=g['weight_decay'])
          param_norm, update_norm = torch.norm(p), torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0., torch.where(
              update_norm > 0, (g['trust_coefficient'] * param_norm / update_norm), one), one)
          dp = dp.mul(q)
        state = self.state[p]
        if 'mu' not in state:
          state['mu'] = torch.zeros_like(p)
        mu = state['mu']
        mu.mul_(g['momentum']).add_(dp)
        p.add_(mu, alpha=-g['lr'])


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_lars_matches_reference(weight_decay):
  rs = np.random.RandomState(0)
  params = {'kernel': rs.randn(6, 4).astype(np.float32), 'bias': rs.randn(4).astype(np.float32)}
  grads = [{k: rs.randn(*v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(4)]
  lrs = [0.0, 0.5, 1.0, 0.3]  # warmup then decay: the lr changes every step
  tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  ref = _ReferenceLARS(list(tparams.values()), weight_decay=weight_decay)
  tx = linear_probe.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=weight_decay)
  jparams = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(jparams)
  for lr, g in zip(lrs, grads):
    for group in ref.param_groups:
      group['lr'] = lr
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    ref.step()
    updates, state = tx.update(g, state, jparams)
    jparams = optax.apply_updates(jparams, updates)
  for k, p in tparams.items():
    np.testing.assert_allclose(jparams[k], p.detach().numpy(), rtol=1e-5, atol=1e-6)
  # optax.lars scales by the lr before the momentum trace, which differs under a schedule.
  tx2 = optax.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=weight_decay,
                   weight_decay_mask=lambda t: jax.tree_util.tree_map(lambda x: x.ndim > 1, t),
                   trust_ratio_mask=lambda t: jax.tree_util.tree_map(lambda x: x.ndim > 1, t))
  p2 = jax.tree_util.tree_map(jnp.asarray, params)
  s2 = tx2.init(p2)
  for g in grads:
    u, s2 = tx2.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u)
  assert not np.allclose(p2['bias'], tparams['bias'].detach().numpy(), atol=1e-4)


# --- BatchNorm of the linear probe -----------------------------------------------------------

def test_feature_batch_norm_matches_torch_and_is_device_count_invariant():
  x = np.random.RandomState(0).randn(16, 8).astype(np.float32) * 3 + 1
  bn = classifier_lib.FeatureBatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, train=True)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  ref = torch.nn.BatchNorm1d(8, affine=False, eps=1e-6)
  ref.train()
  y_ref = ref(torch.tensor(x)).detach().numpy()
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], ref.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(stats['var'], ref.running_var.numpy(), rtol=1e-5)
  ref.eval()
  np.testing.assert_allclose(bn.apply({'batch_stats': stats}, x, train=False),
                             ref(torch.tensor(x)).detach().numpy(), atol=1e-5)
  # 8 devices with axis_name: the same outputs and statistics as one device on the batch.
  bn8 = classifier_lib.FeatureBatchNorm(axis_name='batch')
  y8, up8 = jax.pmap(lambda v, xs: bn8.apply(v, xs, train=True, mutable=['batch_stats']),
                     axis_name='batch')(classification.replicate(variables), x.reshape(NDEV, 2, 8))
  np.testing.assert_allclose(np.asarray(y8).reshape(16, 8), y, atol=1e-5)
  for k in ('mean', 'var'):
    np.testing.assert_allclose(up8['batch_stats'][k][3], stats[k], rtol=1e-5, atol=1e-6)


# --- Train steps -----------------------------------------------------------------------------

def _init(model):
  v = _jit_init(model)
  return dict(v['params']), dict(v.get('batch_stats', {}))


@pytest.fixture(scope='module')
def probe_setup():
  model = classifier_lib.classifier_from_config(
      tiny_model_cfg(), NUM_CLASSES, global_pool=False, probe_batch_norm=True,
      head_init_std=0.01, bn_axis_name=classification.AXIS)
  params, bs = _init(model)
  tx = linear_probe.lars(lambda s: 0.5)
  step = jax.pmap(linear_probe.train_step, axis_name=classification.AXIS, in_axes=(0, 0, None))
  return model, params, bs, tx, step


def test_linear_probe_step_freezes_encoder(probe_setup):
  model, params, bs, tx, step = probe_setup
  state = linear_probe.create_train_state(model, params, bs, tx)
  assert set(state.params) == {'head'}
  # Optimizer state only for the head.
  opt_paths = {'/'.join(str(getattr(k, 'key', k)) for k in path)
               for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  arrays = {p for p in opt_paths if not p.endswith('count')}
  assert arrays and all('/head/' in p for p in arrays), opt_paths
  rstate = classification.replicate(state)
  for i in range(2):
    rstate, metrics = step(rstate, shard(synthetic_batch(16, i)), jax.random.PRNGKey(i))
  new = jax_utils.unreplicate(rstate)
  for key, value in flat(params['encoder']).items():
    np.testing.assert_array_equal(flat(new.frozen['encoder'])[key], value, err_msg=key)
  assert not np.allclose(new.params['head']['kernel'], params['head']['kernel'])
  assert not np.allclose(new.batch_stats['head_norm']['mean'], 0.0)
  assert np.isfinite(float(metrics['loss'][0]))


def test_linear_probe_step_8_devices_equals_1_device(probe_setup):
  model, params, bs, tx, step = probe_setup
  state = linear_probe.create_train_state(model, params, bs, tx)
  batch = synthetic_batch(16, 5)
  s8, m8 = step(classification.replicate(state), shard(batch), jax.random.PRNGKey(0))
  step1 = jax.pmap(linear_probe.train_step, axis_name=classification.AXIS, in_axes=(0, 0, None),
                   devices=jax.devices()[:1])
  s1, m1 = step1(classification.replicate(state, devices=jax.devices()[:1]), shard(batch, 1),
                 jax.random.PRNGKey(0))
  np.testing.assert_allclose(m8['loss'][0], m1['loss'][0], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((s8.params, s8.batch_stats)),
                  jax.tree_util.tree_leaves((s1.params, s1.batch_stats))):
    np.testing.assert_allclose(a[0], b[0], rtol=2e-4, atol=1e-6)


@pytest.fixture(scope='module')
def finetune_setup():
  cfg = tiny_model_cfg(depth=4)
  model = classifier_lib.classifier_from_config(cfg, NUM_CLASSES, global_pool=True,
                                                drop_path_rate=0.1)
  params, _ = _init(model)
  config = ml_collections.ConfigDict(dict(model=dict(depth=4), layer_decay=0.75,
                                          weight_decay=0.05, b1=0.9, b2=0.999))
  mixup = {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0, 'switch_prob': 0.5}
  step = jax.pmap(functools.partial(finetune.train_step, num_classes=NUM_CLASSES, mixup=mixup,
                                    label_smoothing=0.1),
                  axis_name=classification.AXIS, in_axes=(0, 0, None))
  return model, params, config, step


@pytest.mark.parametrize('k,changed', [
    (2, {'encoder/blocks_2', 'encoder/blocks_3', 'fc_norm', 'head'}),
    (0, {'fc_norm', 'head'}),
])
def test_partial_finetune_trains_exactly_last_blocks(finetune_setup, k, changed):
  model, params, config, step = finetune_setup
  is_trained = classification.last_blocks_trained(4, k)
  tx_factory = lambda trained: finetune.make_optimizer(config, lambda _: 1e-3, trained)
  state = finetune.create_train_state(model, params, is_trained, tx_factory)
  # Adam moments exist for the trained params only.
  for moments in ('mu', 'nu'):
    in_state = {'/'.join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
                for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
                if any(getattr(k, 'name', None) == moments for k in path)}
    assert in_state == set(flat(state.params)), moments
  rstate = classification.replicate(state)
  rstate, _ = step(rstate, shard(synthetic_batch(16, 1)), jax.random.PRNGKey(0))
  new = jax_utils.unreplicate(rstate)
  merged = flat(classification.merge_params(new.params, new.frozen))
  for key, value in flat(params).items():
    group = '/'.join(key.split('/')[:2]) if key.startswith('encoder/blocks') else (
        key.split('/')[0] if key.split('/')[0] != 'encoder' else key)
    if group in changed:
      assert not np.array_equal(merged[key], value), key
    else:
      np.testing.assert_array_equal(merged[key], value, err_msg=key)


def test_finetune_step_lowers_loss(finetune_setup):
  """Learning, not just motion: repeated steps on one batch lower its loss (k=2, compiled
  above); full fine-tuning trains every param and freezes none."""
  model, params, config, step = finetune_setup
  tx_factory = lambda trained: finetune.make_optimizer(config, lambda _: 3e-3, trained)
  full = finetune.create_train_state(model, params, classification.last_blocks_trained(4, None),
                                     tx_factory)
  assert not full.frozen and set(flat(full.params)) == set(flat(params))
  state = finetune.create_train_state(model, params, classification.last_blocks_trained(4, 2),
                                      tx_factory)
  rstate = classification.replicate(state)
  batch = shard(synthetic_batch(16, 2))
  losses = []
  for i in range(4):
    rstate, metrics = step(rstate, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics['loss'][0]))
  assert losses[-1] < losses[0], losses


def test_drop_path_is_keyed_by_example_index():
  """Each example's stochastic depth depends on its global index only: reordering the batch
  reorders the outputs, and about `rate` of the examples lose the branch."""
  from mae_jax.model.vit import DropPath
  drop = DropPath(0.5)
  x = jnp.ones((64, 3, 2))
  ids = jnp.arange(64) + 7
  run = lambda x, ids: drop.apply({}, x, False, ids, rngs={'dropout': jax.random.PRNGKey(5)})
  out = np.asarray(run(x, ids))
  kept = out[:, 0, 0] > 0
  assert set(np.unique(out)) == {0.0, 2.0}  # dropped, or kept and rescaled by 1 / keep
  assert 16 < kept.sum() < 48
  perm = np.random.RandomState(0).permutation(64)
  np.testing.assert_array_equal(np.asarray(run(x[perm], ids[perm])), out[perm])
  np.testing.assert_array_equal(np.asarray(drop.apply({}, x, True, ids)), x)


@pytest.mark.slow  # the step on another device count: `pytest -m slow`
def test_finetune_step_with_drop_path_8_devices_equals_1_device():
  """Drop path keyed per example: a strong rate gives the same step on 8 devices and on 1."""
  # A large head init: the loss then depends on the features, hence on the drop masks.
  model = classifier_lib.classifier_from_config(tiny_model_cfg(depth=4), NUM_CLASSES,
                                                global_pool=True, drop_path_rate=0.5,
                                                head_init_std=0.5)
  params, _ = _init(model)
  config = ml_collections.ConfigDict(dict(model=dict(depth=4), layer_decay=0.75,
                                          weight_decay=0.05, b1=0.9, b2=0.999))
  state = finetune.create_train_state(
      model, params, classification.last_blocks_trained(4, None),
      lambda trained: finetune.make_optimizer(config, lambda _: 1e-3, trained))
  bound = functools.partial(finetune.train_step, num_classes=NUM_CLASSES, label_smoothing=0.1,
                            mixup={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0, 'switch_prob': 0.5})
  batch = synthetic_batch(16, 3)
  results = []
  for n in (NDEV, 1):
    step = jax.pmap(bound, axis_name=classification.AXIS, in_axes=(0, 0, None),
                    devices=jax.devices()[:n])
    new, metrics = step(classification.replicate(state, devices=jax.devices()[:n]),
                        shard(batch, n), jax.random.PRNGKey(1))
    results.append((float(metrics['loss'][0]), flat(classification.unreplicate(new).params)))
  (loss8, p8), (loss1, p1) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for key in p1:
    a, b = p8[key], p1[key]
    if key.endswith('qkv/bias'):  # the key bias has a zero gradient (softmax shift), and
      d = a.shape[0] // 3  # Adam turns its rounding noise into full-size steps
      a, b = np.delete(a, np.s_[d:2 * d]), np.delete(b, np.s_[d:2 * d])
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize('k', [-1, 5, 2.0, True])
def test_trainable_blocks_out_of_range(k):
  with pytest.raises(ValueError, match=r'outside \[0, depth=4\]'):
    classification.last_blocks_trained(4, k)


def test_eval_step_counts_valid_examples_only():
  model = classifier_lib.classifier_from_config(tiny_model_cfg(), NUM_CLASSES, global_pool=True)
  params, _ = _init(model)
  state = classification.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optax.identity(), frozen={}, batch_stats={})
  batch = synthetic_batch(16, 3)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch['image']))
  batch['label'] = logits.argmax(-1).astype(np.int32)  # every example right...
  valid = np.arange(16) < 11
  batch['label'][~valid] = (batch['label'][~valid] + 1) % NUM_CLASSES  # ...but the padding
  batch['valid'] = valid
  sums = jax.pmap(classification.eval_step, axis_name=classification.AXIS)(
      classification.replicate(state), shard(batch))
  result = classification.summarize_eval(jax.tree_util.tree_map(lambda x: x[0], sums))
  assert result['count'] == 11 and result['top1'] == 100.0 and result['top5'] == 100.0


# --- train_and_evaluate: runs, eval-only, resume, bad input ----------------------------------

def _run_config(job, **overrides):
  from mae_jax.jobs import recipes
  config = (recipes.linear_probe_config('demo') if job == 'linear_probe'
            else recipes.finetune_config('demo'))
  config.model = tiny_model_cfg()
  fields = dict(total_steps=4, warmup_steps=1, batch_size=16, eval_batch_size=72,
                log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=2,
                async_checkpointing=False)
  fields.update(overrides)
  config.update(fields)
  return config


@pytest.fixture(scope='module')
def pretrained_dir(tiny_mae_params, tmp_path_factory):
  """A params-only checkpoint (the format converted PyTorch releases are stored in)."""
  from mae_jax.io import checkpoint
  path = tmp_path_factory.mktemp('pretrained') / 'mae_tiny'
  checkpoint.save_params(str(path), tiny_mae_params, dict(tiny_model_cfg()))
  return str(path)


def _read_jsonl(path):
  import json
  return [json.loads(line) for line in open(path)]


def test_linear_probe_run_eval_only_and_resume(pretrained_dir, tiny_mae_params, tmp_path,
                                               monkeypatch):
  import os
  import signal
  from mae_jax.io import checkpoint
  from mae_jax.jobs import downstream
  from mae_jax.jobs import preemption
  workdir = str(tmp_path / 'probe')
  config = _run_config('linear_probe', init_from=pretrained_dir)
  result = linear_probe.train_and_evaluate(config, workdir)
  records = _read_jsonl(f'{workdir}/metrics.jsonl')
  logged = [r for r in records if 'eval/top1' in r]
  assert logged[-1]['step'] == 4 and logged[-1]['eval/top1'] == result['top1']
  assert logged[-1]['eval/count'] == 72  # every embedded test tile, padding excluded
  assert any('train/loss' in r for r in records)
  # curves.png: loss, lr and the eval top-1 over steps, drawn at the checkpoints.
  from mae_jax.io import curves
  assert os.path.getsize(f'{workdir}/curves.png') > 0
  panels = {ax.get_title(): {l.get_label() for l in ax.lines}
            for ax in curves.plot_curves(records).axes if ax.get_visible()}
  assert list(panels) == ['loss', 'lr', 'top-1'], panels
  assert {'eval/top1', 'eval/top5'} <= panels['top-1']

  # The saved encoder is the pretrained one, bit for bit (frozen through training).
  params, _ = checkpoint.load_params(workdir)
  for key, value in flat(tiny_mae_params['encoder']).items():
    np.testing.assert_array_equal(flat(params['encoder'])[key], value, err_msg=key)

  # Eval-only from the checkpoint reproduces the logged accuracy.
  config.eval_only = True
  again = linear_probe.train_and_evaluate(config, workdir)
  assert again['top1'] == logged[-1]['eval/top1'] and again['top5'] == result['top5']
  assert _read_jsonl(f'{workdir}/eval_only.jsonl')[-1]['eval/top1'] == result['top1']

  # SIGTERM while the batch of step 3 is read: the run saves the step in flight and stops;
  # the rerun reaches the same step-4 params as the full run.
  create_dataset = downstream.pipeline.create_dataset

  def sigterm_at_step_3(*args, **kwargs):
    stream = create_dataset(*args, **kwargs)
    if kwargs['mode'] == 'eval':
      return stream
    def batches():
      for step, batch in enumerate(stream, start=kwargs['start_step'] + 1):
        if step == 3:
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch
    return batches()

  resumed = str(tmp_path / 'resumed')
  config.eval_only = False
  monkeypatch.setattr(downstream.pipeline, 'create_dataset', sigterm_at_step_3)
  linear_probe.train_and_evaluate(config, resumed)
  stop = preemption.last_stop()
  assert stop['reason'] == 'SIGTERM' and stop['step'] < 4
  assert max(int(p) for p in os.listdir(f'{resumed}/checkpoints')) == stop['step']
  monkeypatch.undo()
  linear_probe.train_and_evaluate(config, resumed)
  full, _ = checkpoint.load_params(f'{workdir}/checkpoints/4')
  part, _ = checkpoint.load_params(f'{resumed}/checkpoints/4')
  for key, value in flat(full).items():
    np.testing.assert_array_equal(flat(part)[key], value, err_msg=key)


def test_partial_finetune_run_keeps_frozen_blocks(pretrained_dir, tiny_mae_params,
                                                        tmp_path):
  """Partial fine-tuning with k=1 through train_and_evaluate: frozen blocks keep their
  pretrained values in the checkpoint, the trained block moves."""
  from mae_jax.io import checkpoint
  workdir = str(tmp_path / 'partial')
  config = _run_config('finetune', init_from=pretrained_dir, trainable_blocks=1,
                       total_steps=2, eval_every_steps=2)
  result = finetune.train_and_evaluate(config, workdir)
  assert 0.0 <= result['top1'] <= 100.0 and result['count'] == 72
  params, _ = checkpoint.load_params(workdir)
  src = flat(tiny_mae_params['encoder'])
  got = flat(params['encoder'])
  for key, value in src.items():
    if key.startswith('blocks_1/'):
      continue
    if key.startswith('norm/'):
      assert key not in got  # global pool: the final norm is unused
      continue
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert not np.array_equal(got['blocks_1/mlp/fc1/kernel'], src['blocks_1/mlp/fc1/kernel'])

  # Eval-only from a params-only copy (the format of a converted fine-tuned release).
  exported = str(tmp_path / 'exported')
  checkpoint.save_params(exported, params, None)
  config.eval_only, config.eval_from = True, exported
  again = finetune.train_and_evaluate(config, str(tmp_path / 'eval'))
  assert again['top1'] == result['top1'] and again['loss'] == pytest.approx(result['loss'])


def test_bad_inputs_fail_before_training(pretrained_dir, tmp_path):
  workdir = tmp_path / 'bad'
  # Linear probe without a checkpoint.
  with pytest.raises(ValueError, match='init_from'):
    linear_probe.train_and_evaluate(_run_config('linear_probe'), str(workdir))
  # k outside [0, depth].
  with pytest.raises(ValueError, match=r'trainable_blocks=3 is outside \[0, depth=2\]'):
    finetune.train_and_evaluate(_run_config('finetune', init_from=pretrained_dir,
                                            trainable_blocks=3), str(workdir))
  # A checkpoint of another encoder size: names the param and both shapes.
  config = _run_config('finetune', init_from=pretrained_dir)
  config.model = tiny_model_cfg(embed_dim=32)
  with pytest.raises(ValueError, match=r'encoder/\S+ has shape \(.*\) in .* but \(.*\) in the '
                                       r'config'):
    finetune.train_and_evaluate(config, str(workdir))
  assert not (workdir / 'checkpoints').exists()
  assert not (workdir / 'metrics.jsonl').exists()


# --- The encoder's architecture from the checkpoint ------------------------------------------

def test_linear_probe_takes_the_architecture_from_the_checkpoint(pretrained_dir,
                                                                 tiny_mae_params, tmp_path):
  """The demo recipe's default encoder (128 wide, 4 blocks) is not the checkpoint's (64 wide,
  2 blocks): with config.model left alone, the checkpoint's architecture is used."""
  from mae_jax.io import checkpoint
  from mae_jax.jobs import recipes
  config = recipes.linear_probe_config('demo')
  assert config.model.embed_dim is None and config.default_model.embed_dim == 128
  config.update(dict(init_from=pretrained_dir, total_steps=2, warmup_steps=1, batch_size=16,
                     eval_batch_size=72, eval_every_steps=2, async_checkpointing=False))
  workdir = str(tmp_path / 'probe')
  result = linear_probe.train_and_evaluate(config, workdir)
  assert result['count'] == 72
  assert config.model.embed_dim is None  # the caller's config is not modified
  params, record = checkpoint.load_params(workdir)
  assert {k: record[k] for k in ('embed_dim', 'depth', 'num_heads', 'img_size', 'patch_size')
          } == dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=4)
  for key, value in flat(tiny_mae_params['encoder']).items():
    np.testing.assert_array_equal(flat(params['encoder'])[key], value, err_msg=key)
  # Eval-only takes it from the workdir's checkpoint.
  config.eval_only = True
  assert linear_probe.train_and_evaluate(config, workdir)['top1'] == result['top1']


def test_architecture_precedence_config_then_checkpoint_then_default(pretrained_dir, tmp_path):
  from mae_jax.io import checkpoint
  from mae_jax.jobs import architecture, recipes
  config = recipes.finetune_config('cifar10')
  config.init_from = pretrained_dir
  config.model.img_size = 48  # a resolution change: set in the config, kept
  resolved = architecture.resolve(config, pretrained_dir)
  assert (resolved.model.img_size, resolved.model.embed_dim, resolved.model.depth) == (48, 64, 2)
  assert config.model.embed_dim is None
  # No checkpoint: the recipe's default_model (the random-init baseline).
  config.init_from = None
  resolved = architecture.resolve(config, None)
  assert (resolved.model.img_size, resolved.model.embed_dim, resolved.model.depth) == (48, 128, 4)
  # Neither: the error names the fields and the fix.
  with config.unlocked():
    config.default_model = None
  with pytest.raises(ValueError, match=r'config.model.patch_size, .*no checkpoint is given.*'
                                       r'init_from'):
    architecture.resolve(config, None)
  bare = str(tmp_path / 'bare')
  checkpoint.save_params(bare, {'encoder': {}}, None)
  with pytest.raises(ValueError, match=r'stores no model config'):
    architecture.resolve(config, bare)
  # Set explicitly, nothing is read (a missing checkpoint would raise).
  config.model = tiny_model_cfg()
  assert architecture.resolve(config, str(tmp_path / 'nowhere')).model.embed_dim == 64


def test_explicit_architecture_that_does_not_fit_the_checkpoint_is_named(pretrained_dir,
                                                                          tmp_path):
  from mae_jax.jobs import recipes
  config = recipes.linear_probe_config('demo')
  config.update(dict(init_from=pretrained_dir, total_steps=2, warmup_steps=1, batch_size=16))
  config.model.embed_dim = 32
  with pytest.raises(ValueError, match=r'encoder/\S+ has shape .* but .* in the config'):
    linear_probe.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
