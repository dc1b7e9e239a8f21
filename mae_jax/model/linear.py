"""The matrix product of every Linear layer, with its weight gradient written in canonical form.

`dense_dot_general` is a drop-in `dot_general` for `nn.Dense` (and `linear` the same for a
bare `x @ kernel`). The forward product and the input gradient are the ones JAX's autodiff
gives. Only the kernel gradient is spelled differently: as `dot(x, g)` contracting every
leading (batch and token) axis, instead of JAX's transpose rule, which yields `dot(g, x)`
followed by a transpose of the result.

The two are the same sum of the same products. What changes is what XLA's CPU backend
makes of them. From JAX's form, XLA lays the output gradient `g` out transposed, and the
result is a product whose operands are both "column major". YNNPACK (XLA's fast CPU matmul
library) does not take those, so each weight gradient ran on XLA's slower Eigen dot, after
a transposing copy of `g`. From `dot(x, g)`, XLA transposes `x` instead, and the product is
one YNNPACK takes. On GPUs and TPUs both forms compile to the same library call, so there
`linear` is plain `lax.dot_general` and its gradient JAX's own.

The price of a `jax.custom_vjp`: on the CPU backend these layers have no forward-mode
derivative (`jax.jvp`, `jax.jacfwd`); reverse mode (`jax.grad`, `jax.vjp`), `jax.checkpoint`,
`vmap`, `pmap` and `shard_map` work as before. `canonical_weight_grad(False)` turns the
rewrite off where forward mode is needed.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

import jax
from jax import lax

DimensionNumbers = Tuple[Tuple[Sequence[int], Sequence[int]], Tuple[Sequence[int], Sequence[int]]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _linear_fwd(x, kernel, precision):
  return _linear(x, kernel, precision), (x, kernel)


def _linear_bwd(precision, residuals, g):
  x, kernel = residuals
  # d/dx: g [..., n] . kernel [k, n] over n, as autodiff gives it.
  dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  # d/dkernel: x [..., k] . g [..., n] over every leading axis -> [k, n].
  leading = tuple(range(x.ndim - 1))
  dkernel = lax.dot_general(x, g, ((leading, leading), ((), ())), precision=precision)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


_ENABLED = True


def canonical_weight_grad(enabled: bool) -> None:
  """Turns the kernel-gradient rewrite on (the default) or off, for models traced after this."""
  global _ENABLED
  _ENABLED = bool(enabled)


def _rewrite() -> bool:
  return _ENABLED and jax.default_backend() == 'cpu'


def linear(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """`x @ kernel` for `x` [..., k] and a 2-D `kernel` [k, n], with the canonical kernel gradient.

  Numerically the same product and gradients as `x @ kernel`; see the module docstring.
  """
  if kernel.ndim != 2 or x.ndim < 2 or x.dtype != kernel.dtype or not _rewrite():
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return _linear(x, kernel, precision)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers,
                      precision: Any = None,
                      preferred_element_type: Optional[Any] = None) -> jax.Array:
  """`lax.dot_general` for `nn.Dense(dot_general=...)`; the Dense contraction goes to `linear`.

  Any other contraction, or a `preferred_element_type`, is passed to `lax.dot_general` as is.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  is_dense = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
              and not tuple(lhs_batch) and not tuple(rhs_batch))
  if not is_dense or preferred_element_type is not None:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return linear(lhs, rhs, precision)
