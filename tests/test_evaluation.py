import numpy as np
import pytest

from nnclr_tf.evaluation import knn_scores, topk_accuracy


def brute_force_knn(train, train_labels, queries, num_classes, k, t):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  scores = np.zeros((len(queries), num_classes))
  for i, q in enumerate(queries):
    q = q / np.linalg.norm(q)
    sims = train @ q
    for j in np.argsort(-sims)[:k]:
      scores[i, train_labels[j]] += np.exp(sims[j] / t)
  return scores


def test_knn_matches_brute_force():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(300, 16)).astype(np.float32)
  labels = rng.integers(0, 7, size=300)
  queries = rng.normal(size=(50, 16)).astype(np.float32)
  got = knn_scores(train, labels, queries, 7, k=20, temperature=0.1, batch_size=16)
  want = brute_force_knn(train, labels, queries, 7, 20, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert np.array_equal(np.argmax(got, 1), np.argmax(want, 1))


def test_topk_accuracy():
  scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
  labels = np.array([1, 2, 0])
  assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
  assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
  assert topk_accuracy(scores, labels, 3) == pytest.approx(1.0)
