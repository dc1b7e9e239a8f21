"""Evaluation of frozen features: k-NN against a brute-force NumPy computation and a separable
toy set; the logistic-regression probe against scikit-learn's LogisticRegression."""
import numpy as np
import pytest

from mae_jax.evaluators import knn, logistic


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
  """DINO's eval_knn.py in NumPy, float64: cosine, top-k, votes exp(sim / T), argmax."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sims = test.astype(np.float64) @ train.astype(np.float64).T
  top = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  votes = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    np.add.at(votes[i], train_labels[top[i]], np.exp(sims[i, top[i]] / temperature))
  return votes.argmax(1)


@pytest.mark.parametrize('k,temperature', [(20, 0.07), (1, 0.07), (7, 0.5)])
def test_knn_matches_brute_force(k, temperature):
  rs = np.random.RandomState(k)
  train = rs.randn(300, 16).astype(np.float32)
  labels = rs.randint(0, 5, 300)
  test = rs.randn(77, 16).astype(np.float32) * 3.0  # any scale: features are normalised
  ours = knn.knn_predict(train, labels, test, k=k, temperature=temperature, batch_size=32)
  ref = brute_force_knn(train, labels, test, k, temperature, 5)
  np.testing.assert_array_equal(ours, ref)
  acc = knn.knn_top1(train, labels, test, ref, k=k, temperature=temperature)
  assert acc == 100.0


def test_knn_weighs_votes_by_similarity():
  """Two far neighbours of class 1 lose to one very close neighbour of class 0 at T = 0.07
  (a plain majority vote would say 1), and win at a high temperature."""
  train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[1.0, 0.01]], np.float32)
  assert knn.knn_predict(train, labels, query, k=3, temperature=0.07)[0] == 0
  assert knn.knn_predict(train, labels, query, k=3, temperature=100.0)[0] == 1


def test_knn_on_a_separable_toy_set_is_perfect():
  rs = np.random.RandomState(0)
  directions = np.eye(8, dtype=np.float32)[:4] * 10
  train_labels = np.repeat(np.arange(4), 50)
  test_labels = np.repeat(np.arange(4), 25)
  train = directions[train_labels] + rs.randn(200, 8).astype(np.float32)
  test = directions[test_labels] + rs.randn(100, 8).astype(np.float32)
  assert knn.knn_top1(train, train_labels, test, test_labels) == 100.0
  # Shuffled labels: the same features carry no signal.
  shuffled = rs.permutation(train_labels)
  assert knn.knn_top1(train, shuffled, test, test_labels) < 60.0


def test_knn_bad_input():
  train, labels = np.ones((5, 3), np.float32), np.zeros(5, int)
  with pytest.raises(ValueError, match='same'):
    knn.knn_predict(train, labels, np.ones((2, 4), np.float32))
  with pytest.raises(ValueError, match=r'k=20 neighbours, but the memory bank holds 5'):
    knn.knn_predict(train, labels, np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match='negative'):
    knn.knn_predict(train, -labels - 1, np.ones((2, 3), np.float32), k=2)
  with pytest.raises(ValueError, match='one label per row'):
    knn.knn_top1(train, labels, np.ones((2, 3), np.float32), np.zeros(3), k=2)


def _blobs(seed, n, d=6, k=4):
  rs = np.random.RandomState(seed)
  centers = rs.randn(k, d) * 1.2
  y = rs.randint(0, k, n)
  x = centers[y] + rs.randn(n, d) * 1.3
  return (x * rs.uniform(0.5, 3, d) + rs.randn(d) * 2).astype(np.float32), y


@pytest.mark.parametrize('C', [0.01, 1.0])
def test_logistic_regression_matches_scikit_learn(C):
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  x, y = _blobs(0, 400)
  scaler = StandardScaler().fit(x)
  xs = scaler.transform(x)
  ref = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(xs, y)
  mean, scale = logistic.standardizer(x)
  np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-5)
  ours = logistic.fit((x - mean) / scale, y, C=C)
  assert ours.converged and ours.max_abs_grad <= 1e-5
  # The same minimiser: the L2 strength is matched (C=0.01 shrinks the weights ~10x).
  np.testing.assert_allclose(ours.kernel.T, ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())
  np.testing.assert_allclose(ours.bias, ref.intercept_, atol=2e-3 * np.abs(ref.coef_).max())
  np.testing.assert_array_equal(logistic.predict(ours, (x - mean) / scale), ref.predict(xs))


def test_probe_scores_the_test_split_like_scikit_learn():
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  x, y = _blobs(1, 600)
  train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
  result = logistic.probe(train_x, train_y, test_x, test_y, C=0.5)
  scaler = StandardScaler().fit(train_x)
  ref = LogisticRegression(C=0.5, max_iter=10000).fit(scaler.transform(train_x), train_y)
  assert result['top1'] == pytest.approx(100 * ref.score(scaler.transform(test_x), test_y))
  assert 50.0 < result['top1'] < 100.0 and result['converged']


def test_logistic_regression_bad_input():
  with pytest.raises(ValueError, match=r'\(N, D\) features'):
    logistic.fit(np.ones((4, 2)), np.zeros(3, int))
  with pytest.raises(ValueError, match='integers >= 0'):
    logistic.fit(np.ones((4, 2)), -np.ones(4, int))
  with pytest.raises(ValueError, match='positive'):
    logistic.fit(np.ones((4, 2)), np.zeros(4, int), C=0.0)
