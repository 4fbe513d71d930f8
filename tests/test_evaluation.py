import numpy as np
import pytest

from nnclr_tf.evaluation import (cached_features, feature_cache_path, knn_batch_size, knn_scores,
                                 topk_accuracy)


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


@pytest.mark.parametrize("num_classes,k,batch", [(50, 30, None), (3, 500, 7)])
def test_knn_many_classes_default_batch_and_k_above_train_size(num_classes, k, batch):
  """Segment-sum votes equal the brute force with many classes, with the automatic batch size,
  with a batch that does not divide the query count, and with k clamped to the train size."""
  rng = np.random.default_rng(1)
  train = rng.normal(size=(120, 8)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=120)
  queries = rng.normal(size=(45, 8)).astype(np.float32)
  got = knn_scores(train, labels, queries, num_classes, k=k, temperature=0.2, batch_size=batch)
  want = brute_force_knn(train, labels, queries, num_classes, min(k, 120), 0.2)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_knn_batch_size_bounds_the_similarity_matrix():
  assert knn_batch_size(50_000) * 50_000 * 8 <= 256 * 2 ** 20
  assert knn_batch_size(100) == 1024 and knn_batch_size(10 ** 9) == 1


def test_feature_cache_is_reused_and_keyed(tmp_path):
  import tensorflow as tf
  from nnclr_tf.config import DataConfig
  calls = []

  def encoder(x, training=False):
    calls.append(1)
    return tf.reduce_mean(x, axis=[1, 2])

  ds = tf.data.Dataset.from_tensor_slices((np.ones((6, 4, 4, 3), np.float32) * 0.5,
                                           np.arange(6, dtype=np.int32))).batch(4)
  path = feature_cache_path(str(tmp_path), "/m/ckpt-7", DataConfig(), 0)
  assert path != feature_cache_path(str(tmp_path), "/m/ckpt-8", DataConfig(), 0)
  assert path != feature_cache_path(str(tmp_path), "/m/ckpt-7", DataConfig(val_images=5), 0)
  first = cached_features(path, encoder, ds, ds)
  n = len(calls)
  second = cached_features(path, encoder, ds, ds)
  assert len(calls) == n  # read back, not recomputed
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(first[0], 0.5)
  np.testing.assert_array_equal(first[1], np.arange(6))


def test_feature_cache_key_names_the_eval_crop_fraction():
  from nnclr_tf.config import DataConfig
  # Features cached before eval_crop_fraction existed were made at 1.0 and keep their key (this
  # digest is what that code computed); another fraction never reuses them.
  cfg = DataConfig(image_size=16, val_images=5)
  path = feature_cache_path("/m", "/m/ckpt-7", cfg, 0)
  assert path == "/m/features/ckpt-7-55fe4e6826.npz"
  assert path == feature_cache_path("/m", "/m/ckpt-7", DataConfig(image_size=16, val_images=5,
                                                                  eval_crop_fraction=1.0), 0)
  assert path != feature_cache_path("/m", "/m/ckpt-7", DataConfig(image_size=16, val_images=5,
                                                                  eval_crop_fraction=0.875), 0)
