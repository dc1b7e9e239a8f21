"""The Linear layers' matrix product (mae_jax.model.linear): the same values and gradients as
JAX's own `x @ kernel`, with the kernel gradient spelled as `dot(x, g)`.

Parity of the whole model's gradients with Hugging Face ViTMAE (an independent implementation)
is in test_hf_parity.py, which runs with the rewrite on (the CPU default).
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mae_jax import MaskedAutoencoder
from mae_jax.model import linear as linear_lib
from mae_jax.model import presets

TINY = presets.model_config('tiny').to_dict()


@contextlib.contextmanager
def rewrite(enabled):
  linear_lib.canonical_weight_grad(enabled)
  try:
    yield
  finally:
    linear_lib.canonical_weight_grad(True)


def _plain(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _loss(matmul):
  # A non-linear loss, so the output gradient is not a constant.
  return lambda x, kernel: jnp.sum(jnp.tanh(matmul(x, kernel)) ** 2)


@pytest.mark.parametrize('shape', [(24, 16), (3, 8, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_equal_jax_autodiff(shape, dtype, tol):
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, dtype)
  kernel = (jax.random.normal(kk, (16, 12)) * 0.3).astype(dtype)
  np.testing.assert_allclose(np.asarray(linear_lib.linear(x, kernel), np.float32),
                             np.asarray(_plain(x, kernel), np.float32), rtol=tol, atol=tol)
  got = jax.jit(jax.grad(_loss(linear_lib.linear), argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1)))(x, kernel)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)


def _kernel_grad_dots(fn, *args):
  """dot_generals of fn's gradient jaxpr that contract every leading axis of both operands."""
  jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=1))(*args)
  found = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == 'dot_general':
        (lc, rc), _ = eqn.params['dimension_numbers']
        found.append((tuple(lc), tuple(rc), eqn.outvars[0].aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


def test_kernel_gradient_is_dot_of_x_and_g_on_cpu():
  """With the rewrite the kernel gradient is one product that comes out [k, n] (x first);
  without it, JAX's transpose rule gives g first, [n, k], then a transpose."""
  x, kernel = jnp.ones((3, 8, 16)), jnp.ones((16, 12))
  dots = _kernel_grad_dots(_loss(linear_lib.linear), x, kernel)
  assert ((0, 1), (0, 1), (16, 12)) in dots, dots
  with rewrite(False):
    plain = _kernel_grad_dots(_loss(linear_lib.linear), x, kernel)
  assert ((0, 1), (0, 1), (12, 16)) in plain and ((0, 1), (0, 1), (16, 12)) not in plain, plain


def test_other_contractions_and_dtypes_pass_through():
  lhs, rhs = jnp.ones((2, 5, 7)), jnp.ones((2, 7, 3))
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(linear_lib.dense_dot_general(lhs, rhs, batched),
                                lax.dot_general(lhs, rhs, batched))
  x, kernel = jnp.ones((4, 7), jnp.bfloat16), jnp.ones((7, 3))
  out = linear_lib.dense_dot_general(x, kernel, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32


def test_switch_off_gives_forward_mode_back():
  x, kernel = jnp.ones((4, 16)), jnp.full((16, 12), 0.1)
  tangents = (jnp.ones_like(x), jnp.ones_like(kernel))
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(linear_lib.linear, (x, kernel), tangents)
  with rewrite(False):
    _, t = jax.jvp(linear_lib.linear, (x, kernel), tangents)
  np.testing.assert_allclose(t, x @ tangents[1] + tangents[0] @ kernel, rtol=1e-6)


@pytest.mark.parametrize('remat', [False, True])
def test_model_gradients_equal_with_and_without_the_rewrite(remat):
  model = MaskedAutoencoder(**TINY, remat=remat)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  params = jax.jit(model.init)({'params': jax.random.key(1), 'mask': jax.random.key(2)},
                               images)['params']

  def value_and_grad():
    return jax.jit(jax.value_and_grad(
        lambda p: model.apply({'params': p}, images, rngs={'mask': jax.random.key(5)})[0]))(params)

  loss, grads = value_and_grad()
  with rewrite(False):
    loss_plain, grads_plain = value_and_grad()
  assert float(loss) == pytest.approx(float(loss_plain), rel=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
