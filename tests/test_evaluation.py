import dataclasses

import numpy as np
import pytest

from nnclr_tf.evaluation import (
  cached_features,
  feature_cache_path,
  knn_batch_size,
  knn_scores,
  topk_accuracy,
)


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
  stl = DataConfig(dataset="stl10", image_size=16)
  assert feature_cache_path("/m", "/m/ckpt-7", stl, 0) != feature_cache_path(
      "/m", "/m/ckpt-7", dataclasses.replace(stl, knn_train_split="train"), 0)


def brute_force_topk(bank, queries, k):
  bank = bank.astype(np.float64) / np.linalg.norm(bank.astype(np.float64), axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries @ bank.T
  idx = np.argsort(-sims, axis=1)[:, :k]
  return np.take_along_axis(sims, idx, axis=1), idx


@pytest.mark.parametrize("k,bank_chunk,batch", [(5, 7, 3), (20, 64, 11), (40, 25, 50),
                                                (230, 64, 9)])
def test_knn_topk_over_bank_chunks_matches_brute_force(k, bank_chunk, batch):
  """Running top-k merged over bank chunks smaller and larger than k, a last chunk that is
  partial, and query batches that do not divide the queries: the same neighbour sets as sorting
  every similarity (continuous random features, so no ties)."""
  from nnclr_tf.evaluation import knn_topk
  rng = np.random.default_rng(2)
  bank = rng.normal(size=(230, 12)).astype(np.float32) * rng.uniform(0.5, 3, (230, 1))
  queries = rng.normal(size=(31, 12)).astype(np.float32)
  sims, idx = knn_topk(bank, queries, k, batch_size=batch, bank_chunk=bank_chunk)
  want_s, want_i = brute_force_topk(bank, queries, k)
  assert idx.shape == (31, k)
  np.testing.assert_array_equal(np.sort(idx, 1), np.sort(want_i, 1))
  np.testing.assert_allclose(np.sort(sims, 1), np.sort(want_s, 1), rtol=1e-5, atol=1e-6)
  scores = knn_scores(bank, np.arange(230) % 9, queries, 9, k=k, temperature=0.1,
                      batch_size=batch, bank_chunk=bank_chunk)
  np.testing.assert_allclose(scores, brute_force_knn(bank, np.arange(230) % 9, queries, 9, k, 0.1),
                             rtol=1e-4)


def clustered(rng, n, centres, noise):
  labels = rng.integers(0, len(centres), n)
  x = centres[labels] + noise * rng.normal(size=(n, centres.shape[1]))
  return x.astype(np.float32), labels


def test_float16_bank_predicts_like_float32():
  """A float16 bank of L2-normalised rows (half the memory) gives the float32 predictions on
  clustered data where kNN is meaningful: >= 99% equal classes, accuracy within 0.5%."""
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(20, 64))
  bank, bank_l = clustered(rng, 3000, centres, 2.5)
  queries, query_l = clustered(rng, 600, centres, 2.5)
  s32 = knn_scores(bank, bank_l, queries, 20, k=50, temperature=0.1, bank_chunk=512)
  bank16 = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float16)
  s16 = knn_scores(bank16, bank_l, queries, 20, k=50, temperature=0.1, bank_chunk=512)
  acc32, acc16 = topk_accuracy(s32, query_l, 1), topk_accuracy(s16, query_l, 1)
  assert 0.3 < acc32 < 0.99  # neither trivial nor hopeless, so agreement means something
  assert np.mean(np.argmax(s16, 1) == np.argmax(s32, 1)) >= 0.99
  assert abs(acc16 - acc32) <= 0.005


@pytest.mark.parametrize("total", [10, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_extract_features_fills_one_array_and_announces_large_ones(monkeypatch, capsys, total,
                                                                   dtype):
  """Known total or not, the rows come back in order, in the requested dtype, the exact count
  (no unused tail); an extraction over the threshold says rows x dim x bytes first."""
  import tensorflow as tf

  from nnclr_tf import evaluation, progress
  monkeypatch.setattr(evaluation, "ANNOUNCE_BYTES", 10 * 3 * np.dtype(dtype).itemsize)
  monkeypatch.setattr(progress, "_VERBOSE", 2)
  images = np.arange(10 * 2 * 2 * 3, dtype=np.float32).reshape(10, 2, 2, 3)
  ds = tf.data.Dataset.from_tensor_slices((images, np.arange(10, dtype=np.int32))).batch(4)
  feats, labels = evaluation.extract_features(lambda x, training=False: tf.reduce_mean(x, [1, 2]),
                                              ds, "bank", total, dtype)
  assert feats.dtype == dtype and feats.shape == (10, 3)
  np.testing.assert_allclose(feats, images.mean(axis=(1, 2)).astype(dtype), rtol=1e-3)
  np.testing.assert_array_equal(labels, np.arange(10))
  out = capsys.readouterr().out
  if total:
    assert f"bank: 10 x 3 x {np.dtype(dtype).itemsize} B" in out
  else:  # capacity starts at 1,024 rows, above the threshold
    assert "bank: 1,024 x 3" in out and "total unknown" in out


def test_a_damaged_or_mismatched_feature_cache_is_rebuilt(tmp_path, caplog):
  from nnclr_tf.evaluation import read_feature_cache
  path = str(tmp_path / "ckpt-3-abc.npz")
  f, l = np.ones((4, 2), np.float32), np.arange(4)
  np.savez(path, train_features=f, train_labels=l, eval_features=f[:2], eval_labels=l[:2])
  assert [a.shape for a in read_feature_cache(path, (4, 2))] == [(4, 2), (4,), (2, 2), (2,)]
  assert read_feature_cache(path, (5, 2)) is None  # another split's counts
  assert "4 + 2 images, not 5 + 2" in caplog.records[-1].getMessage()
  raw = open(path, "rb").read()
  for damaged in (raw[:len(raw) // 2], b"", raw[:200] + bytes(64) + raw[264:]):
    with open(path, "wb") as fh:
      fh.write(damaged)
    assert read_feature_cache(path, (4, 2)) is None
  assert all("extracting the features again" in r.getMessage() for r in caplog.records)
