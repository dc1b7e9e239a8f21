"""Evaluation of frozen features: k-NN classification and a fast logistic-regression probe.

Functions of feature arrays only (knowing nothing of models, data or jobs), so that a
pretraining run, the feature-extraction job and a user's notebook evaluate the same way:

    from mae_jax.evaluators import knn, logistic
    top1 = knn.knn_top1(train_feats, train_labels, test_feats, test_labels)   # percent
    result = logistic.probe(train_feats, train_labels, test_feats, test_labels, C=1.0)
"""
