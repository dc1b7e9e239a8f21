"""k-nearest-neighbour classification of features, the usual self-supervised protocol.

Wu et al. (InstDisc, 2018) and DINO's eval_knn.py: features are L2-normalised, each query's
cosine similarity to every memory-bank (training) feature is computed, its k = 20 most
similar neighbours vote for their labels with weight exp(similarity / T), T = 0.07, and the
class with the largest total wins.

Queries are processed in fixed-size chunks on the default device (one compilation for any
number of queries); the memory bank stays on that device whole.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

K = 20
TEMPERATURE = 0.07


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows divided by their L2 norm (torch.nn.functional.normalize: norms below eps -> eps)."""
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return features / np.maximum(norms, eps)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _vote(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array, temperature: float,
          k: int, num_classes: int) -> jax.Array:
  sims = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  top_sims, top = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  rows = jnp.arange(queries.shape[0])[:, None]
  votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
  votes = votes.at[rows, bank_labels[top]].add(weights)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def _check(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int) -> None:
  if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
    raise ValueError(f'k-NN needs (N, D) memory-bank and (M, D) query features with the same '
                     f'D; got {bank.shape} and {queries.shape}.')
  if bank_labels.shape != (bank.shape[0],):
    raise ValueError(f'{bank_labels.shape} labels for {bank.shape[0]} memory-bank features: '
                     f'pass one label per row.')
  if len(bank_labels) and bank_labels.min() < 0:
    raise ValueError('The memory-bank labels hold negative values (padding or unlabelled '
                     'examples?): pass only labelled examples.')
  if not 1 <= k <= bank.shape[0]:
    raise ValueError(f'k={k} neighbours, but the memory bank holds {bank.shape[0]} features: '
                     f'choose 1 <= k <= {bank.shape[0]} or use more training examples.')


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                query_features: np.ndarray, *, k: int = K, temperature: float = TEMPERATURE,
                num_classes: Optional[int] = None, batch_size: int = 1024) -> np.ndarray:
  """Predicted labels (int32, M) of `query_features` by similarity-weighted k-NN.

  Args:
    train_features: (N, D) memory-bank features (any scale: they are L2-normalised here).
    train_labels: (N,) their integer labels, >= 0.
    query_features: (M, D) features to classify.
    k: neighbours that vote (DINO: 20).
    temperature: votes weigh exp(cosine similarity / temperature) (DINO: 0.07).
    num_classes: number of classes (default: the largest training label + 1).
    batch_size: queries per compiled call (the last call is padded).
  """
  bank = np.asarray(train_features, np.float32)
  bank_labels = np.asarray(train_labels).astype(np.int32)
  queries = np.asarray(query_features, np.float32)
  _check(bank, bank_labels, queries, k)
  num_classes = int(num_classes or int(bank_labels.max()) + 1)
  bank_dev = jnp.asarray(l2_normalize(bank))
  labels_dev = jnp.asarray(bank_labels)
  queries = l2_normalize(queries)
  chunk = max(1, min(batch_size, len(queries)))
  out = []
  for start in range(0, len(queries), chunk):
    part = queries[start:start + chunk]
    n = len(part)
    if n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n, part.shape[1]), np.float32)])
    out.append(np.asarray(_vote(bank_dev, labels_dev, part, temperature, k, num_classes))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def knn_top1(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
             test_labels: np.ndarray, **kwargs) -> float:
  """Top-1 accuracy (percent) of `knn_predict` on labelled test features."""
  test_labels = np.asarray(test_labels)
  if test_labels.shape != (len(test_features),) or not len(test_labels):
    raise ValueError(f'{test_labels.shape} test labels for {len(test_features)} test features: '
                     f'pass one label per row (and at least one row).')
  pred = knn_predict(train_features, train_labels, test_features, **kwargs)
  return 100.0 * float(np.mean(pred == test_labels))
