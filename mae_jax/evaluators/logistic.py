"""A fast linear probe: multinomial logistic regression on frozen features, to convergence.

The objective is scikit-learn's `LogisticRegression(C=C)` (L2 penalty, lbfgs solver,
multinomial softmax over all classes, unpenalised intercept):

    C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2,

minimised here in the equivalent form mean_i CE + ||W||^2 / (2 C N) (the same minimiser)
by L-BFGS (`optax.lbfgs`, zoom line search) on the full batch, until the largest gradient
entry falls below `tol` or `max_iter` iterations. `probe` standardises the features first
with the training split's mean and standard deviation (scikit-learn's StandardScaler), the
usual recipe for a logistic-regression probe: no augmentation, one deterministic fit.
"""
import functools
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

C_DEFAULT = 1.0  # scikit-learn's default
_HIGHEST = jax.lax.Precision.HIGHEST


class LogisticModel(NamedTuple):
  """A fitted model: logits = features @ kernel + bias."""
  kernel: np.ndarray  # (D, K)
  bias: np.ndarray  # (K,)
  iterations: int
  max_abs_grad: float  # of the mean-form objective at the solution
  converged: bool


def standardizer(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, scale) of each column, scale = std with zeros replaced by 1 (StandardScaler)."""
  features = np.asarray(features, np.float64)
  mean, std = features.mean(0), features.std(0)
  return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _loss(params, x, y, l2):
  logits = jnp.matmul(x, params['kernel'], precision=_HIGHEST) + params['bias']
  picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)
  return ce + 0.5 * l2 * jnp.sum(jnp.square(params['kernel']))


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit(x, y, l2, tol, num_classes: int, max_iter: int):
  params = {'kernel': jnp.zeros((x.shape[1], num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  objective = functools.partial(_loss, x=x, y=y, l2=l2)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def max_abs_grad(state):
    grad = otu.tree_get(state, 'grad')
    return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = otu.tree_get(state, 'count')
    return (count == 0) | ((count < max_iter) & (max_abs_grad(state) > tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  # The state's gradient is that of the last accepted point: recompute it at the solution.
  grad = jax.grad(objective)(params)
  final = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
  return params, otu.tree_get(state, 'count'), final


def fit(features: np.ndarray, labels: np.ndarray, *, num_classes: Optional[int] = None,
        C: float = C_DEFAULT, max_iter: int = 1000, tol: float = 1e-5) -> LogisticModel:
  """Fits scikit-learn's `LogisticRegression(C=C)` objective by L-BFGS (features as given).

  Args:
    features: (N, D) float features (standardise them first, or use `probe`).
    labels: (N,) integer labels in [0, num_classes).
    num_classes: default the largest label + 1.
    C: inverse L2 strength, as scikit-learn's (the penalty is ||W||^2 / (2 C N) per example).
    max_iter: L-BFGS iterations at most.
    tol: stop once every entry of the (mean-form) objective's gradient is below this.
  """
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or y.shape != (len(x),) or not len(x):
    raise ValueError(f'Logistic regression needs (N, D) features and (N,) labels, N > 0; got '
                     f'{x.shape} and {y.shape}.')
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError('Labels must be integers >= 0 (padding or unlabelled examples removed).')
  if not C > 0:
    raise ValueError(f'C={C}: the inverse regularisation strength must be positive.')
  num_classes = int(num_classes or int(y.max()) + 1)
  params, count, final = _fit(jnp.asarray(x), jnp.asarray(y.astype(np.int32)),
                              jnp.float32(1.0 / (C * len(x))), jnp.float32(tol),
                              num_classes=num_classes, max_iter=int(max_iter))
  final = float(final)
  return LogisticModel(kernel=np.asarray(params['kernel']), bias=np.asarray(params['bias']),
                       iterations=int(count), max_abs_grad=final,
                       converged=bool(final <= tol or int(count) < max_iter))


def predict(model: LogisticModel, features: np.ndarray) -> np.ndarray:
  """Predicted labels (int, N)."""
  logits = np.asarray(features, np.float32) @ model.kernel + model.bias
  return np.argmax(logits, axis=1)


def probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
          test_labels: np.ndarray, *, C: float = C_DEFAULT, max_iter: int = 1000,
          tol: float = 1e-5) -> Dict[str, float]:
  """Standardise (train statistics), fit, and score: {'top1' (percent), 'train_top1',
  'iterations', 'converged'}."""
  mean, scale = standardizer(train_features)
  train_x = (np.asarray(train_features, np.float32) - mean) / scale
  test_x = (np.asarray(test_features, np.float32) - mean) / scale
  num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
  model = fit(train_x, train_labels, num_classes=num_classes, C=C, max_iter=max_iter, tol=tol)
  return {'top1': 100.0 * float(np.mean(predict(model, test_x) == np.asarray(test_labels))),
          'train_top1': 100.0 * float(np.mean(predict(model, train_x) ==
                                              np.asarray(train_labels))),
          'iterations': float(model.iterations), 'converged': float(model.converged)}
