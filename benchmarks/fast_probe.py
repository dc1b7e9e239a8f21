"""The fast probe against scikit-learn on the same frozen features (the files of extract_features).

    python -m mae_jax.main --config=configs/extract_features.py:cifar10 --workdir=OUT \
        --config.init_from=CKPT --config.dataset.data_dir=/tmp/cifar
    python benchmarks/fast_probe.py --features OUT [--C 1.0] [--pools cls mean] [--holdout 5]

For each pool: features standardised with the train split's statistics, then
`mae_jax.evaluators.logistic.fit` (L-BFGS through optax, float32) and scikit-learn's
`LogisticRegression(C=C)` (lbfgs, float64) fitted to the same objective; prints one JSON
line per pool with both test top-1 accuracies, their agreement and the seconds each took.
Needs scikit-learn (in the test extra).
"""
import argparse
import json
import os
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--features', required=True, help='workdir of extract_features')
  parser.add_argument('--train', default='train', help='train split name')
  parser.add_argument('--test', default='test', help='eval split name')
  parser.add_argument('--C', type=float, default=1.0, help="scikit-learn's C (both fits)")
  parser.add_argument('--max_iter', type=int, default=1000)
  parser.add_argument('--pools', nargs='+', default=['cls', 'mean'])
  parser.add_argument('--holdout', type=int, default=0,
                      help='N > 0: one file only (--test), rows with index %% N == 0 held out '
                           'as the test set, the rest to fit (a quick check on one split)')
  args = parser.parse_args()
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from mae_jax.evaluators import logistic  # pylint: disable=g-import-not-at-top
  from mae_jax.jobs.extract_features import features_file  # pylint: disable=g-import-not-at-top
  test = dict(np.load(os.path.join(args.features, features_file(args.test))))
  if args.holdout > 0:
    held = test['index'] % args.holdout == 0
    train = {k: v[~held] for k, v in test.items()}
    test = {k: v[held] for k, v in test.items()}
  else:
    train = dict(np.load(os.path.join(args.features, features_file(args.train))))
  for pool in args.pools:
    mean, scale = logistic.standardizer(train[pool])
    xtr, xte = (train[pool] - mean) / scale, (test[pool] - mean) / scale
    start = time.time()
    ours = logistic.fit(xtr, train['label'], C=args.C, max_iter=args.max_iter)
    ours_pred = logistic.predict(ours, xte)
    ours_s = time.time() - start
    start = time.time()
    ref = LogisticRegression(C=args.C, max_iter=args.max_iter).fit(
        xtr.astype(np.float64), train['label'])
    ref_pred = ref.predict(xte.astype(np.float64))
    ref_s = time.time() - start
    print(json.dumps({
        'pool': pool, 'C': args.C, 'train': int(len(xtr)), 'test': int(len(xte)),
        'dim': int(xtr.shape[1]),
        'mae_jax_top1': 100 * float(np.mean(ours_pred == test['label'])),
        'sklearn_top1': 100 * float(np.mean(ref_pred == test['label'])),
        'same_prediction': 100 * float(np.mean(ours_pred == ref_pred)),
        'mae_jax_iterations': ours.iterations, 'mae_jax_converged': ours.converged,
        'sklearn_iterations': int(np.max(ref.n_iter_)),
        'mae_jax_seconds': round(ours_s, 2), 'sklearn_seconds': round(ref_s, 2)}))


if __name__ == '__main__':
  main()
