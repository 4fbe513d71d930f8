"""Evaluation of a representation: feature extraction and weighted kNN (Wu et al. 2018, InstDisc).

kNN: cosine similarity between L2-normalised features; the k most similar training examples vote for
their class with weight exp(s / T); the class with the largest sum wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from nnclr_tf import model_dir as md
from nnclr_tf import progress
from nnclr_tf.results import KnnFigures

ANNOUNCE_BYTES = 2 ** 30


def _human_bytes(n):
  return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MB"


def extract_features(encoder, dataset, name="features", total=None, dtype=np.float32):
  """Runs `encoder(images, training=False)` over a dataset of (images, labels) batches; `name`
  and `total` (images, if known) label its progress (nnclr_tf.progress).

  Rows go into one preallocated [total, dim] array of `dtype` (float16 halves a kNN bank), so the
  peak is that array plus one batch, not a list of batches and its concatenation. Without `total`
  the array doubles as it fills. An extraction of `ANNOUNCE_BYTES` or more says its size first.
  """

  @tf.function(reduce_retracing=True)
  def forward(x):
    return tf.cast(encoder(x, training=False), tf.float32)

  feats = labels = None
  n = 0
  announced = False
  with progress.stage(name, total) as bar:
    for x, y in dataset:
      f, y = forward(x).numpy(), y.numpy()
      rows = len(f)
      if feats is None or n + rows > len(feats):
        capacity = max(total or 0, n + rows) if total else max(2 * n, n + rows, 1024)
        # The estimate is what the finished array will take; with an unknown total it is
        # said when a doubling first crosses the threshold.
        nbytes = capacity * f.shape[1] * np.dtype(dtype).itemsize
        if not announced and nbytes >= ANNOUNCE_BYTES:
          progress.say(f"{name}: {capacity:,} x {f.shape[1]:,} x {np.dtype(dtype).itemsize} B "
                       f"= {_human_bytes(nbytes)} of features"
                       + ("" if total else " so far (total unknown)"))
          announced = True
        grown = np.empty((capacity, *f.shape[1:]), dtype)
        grown_labels = np.empty((capacity, *y.shape[1:]), y.dtype)
        if feats is not None:
          grown[:n], grown_labels[:n] = feats[:n], labels[:n]
        feats, labels = grown, grown_labels
      feats[n:n + rows] = f
      labels[n:n + rows] = y
      n += rows
      bar.update(rows)
  if feats is None:
    return np.zeros((0, 0), dtype), np.zeros((0,), np.int64)
  if n == len(feats):
    return feats, labels
  # A slice would keep the unused tail of the buffer alive as long as the features.
  return feats[:n].copy(), labels[:n].copy()


def knn_batch_size(num_train, budget_mb=256):
  """Queries per batch so that the [batch, num_train] similarity matrix (and argpartition's int64
  indices of it) stay within `budget_mb`: 50,000 train rows -> 671 queries (~128 MB per matrix)."""
  return int(max(1, min(1024, budget_mb * 2 ** 20 // (8 * max(num_train, 1)))))


def _unit_rows(x):
  """Float32 L2-normalised copy of a block of rows (any float dtype)."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def knn_topk(bank, query_features, k, batch_size=None, bank_chunk=32768):
  """(similarities, indices), each [n_query, k], of the k most cosine-similar bank rows to each
  query, in no particular order within a row.

  The bank (float32 or float16, normalised or not) is read `bank_chunk` rows at a time: each chunk
  becomes float32 unit rows, its [batch, chunk] similarities give a per-chunk top-k by
  argpartition, which is merged into the running [batch, k]. Peak memory beyond the bank is
  O(batch x chunk + chunk x D): neither a float32 copy of the bank nor a [queries x bank] matrix.
  """
  num_bank = len(bank)
  k = min(k, num_bank)
  bank_chunk = max(int(bank_chunk), k)
  batch_size = batch_size or knn_batch_size(min(bank_chunk, num_bank))
  n_query = len(query_features)
  top_s = np.empty((n_query, k), np.float32)
  top_i = np.empty((n_query, k), np.int64)
  if k == 0:
    return top_s, top_i
  for q0 in range(0, n_query, batch_size):
    q = _unit_rows(query_features[q0:q0 + batch_size])
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for b0 in range(0, num_bank, bank_chunk):
      sims = q @ _unit_rows(bank[b0:b0 + bank_chunk]).T
      if sims.shape[1] > k:
        part = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        sims = np.take_along_axis(sims, part, axis=1)
      else:
        part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
      best_s = np.concatenate([best_s, sims], axis=1)
      best_i = np.concatenate([best_i, part + b0], axis=1)
      if best_s.shape[1] > k:
        keep = np.argpartition(best_s, best_s.shape[1] - k, axis=1)[:, -k:]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    top_s[q0:q0 + len(q)], top_i[q0:q0 + len(q)] = best_s, best_i
  return top_s, top_i


def knn_scores(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1,
               batch_size=None, bank_chunk=32768):
  """Class scores [n_query, num_classes]: neighbours from `knn_topk`, each voting exp(s / T) for
  its class.

  `train_features` may be float16 (half the memory; see extract_features(dtype=...)); it is never
  copied whole. Votes are a bincount over flat (query, class) slots, never a
  [batch, k, num_classes] one-hot, so 1,000 classes cost no more than 10.
  benchmarks/knn_memory.py measures the peak on a 1,000,000 x 2,048 float16 bank.
  """
  train_labels = np.asarray(train_labels, np.int64)
  k = min(k, len(train_features))
  batch_size = batch_size or knn_batch_size(min(bank_chunk, max(len(train_features), 1)))
  out = np.zeros((len(query_features), num_classes), np.float32)
  with progress.stage(f"kNN (k={k}) over {len(train_features):,} training features",
                      len(query_features), "queries") as bar:
    for i in range(0, len(query_features), batch_size):
      sims, idx = knn_topk(train_features, query_features[i:i + batch_size], k, batch_size,
                           bank_chunk)
      rows = len(sims)
      slots = train_labels[idx] + np.arange(rows)[:, None] * num_classes
      votes = np.bincount(slots.ravel(), weights=np.exp(sims.ravel() / temperature),
                          minlength=rows * num_classes)
      out[i:i + rows] = votes.reshape(rows, num_classes)
      bar.update(rows)
  return out


def topk_accuracy(scores, labels, k):
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def knn_eval(encoder, train_ds, eval_ds, num_classes, k=200, temperature=0.1):
  """{"knn_top1", "knn_top5"} of `encoder`'s features: eval split queried against train split."""
  train_f, train_l = extract_features(encoder, train_ds, "features of the training split")
  eval_f, eval_l = extract_features(encoder, eval_ds, "features of the eval split")
  return knn_eval_features(train_f, train_l, eval_f, eval_l, num_classes, k, temperature)


def knn_eval_features(train_f, train_l, eval_f, eval_l, num_classes, k=200,
                      temperature=0.1) -> KnnFigures:
  """knn_eval on features already extracted (e.g. by `cached_features`)."""
  scores = knn_scores(train_f, train_l, eval_f, num_classes, k, temperature)
  return {"knn_top1": topk_accuracy(scores, eval_l, 1),
          "knn_top5": topk_accuracy(scores, eval_l, 5)}


def feature_cache_path(model_dir, checkpoint, data_cfg, seed, extra=None):
  """model_dir/features/<checkpoint>-<hash of the data config, seed and `extra`>.npz: a new
  checkpoint or a different split (dataset, val_images, seed, image size, eval crop fraction...)
  never reuses stale
  features. checkpoint=None names a random-initialisation encoder; pass its architecture (and
  init seed) in `extra`."""
  fields = dataclasses.asdict(data_cfg)
  # Fields added later, at their defaults, describe the features cached before they existed:
  # left out, those keep their key.
  for name, default in (("eval_crop_fraction", 1.0), ("knn_train_split", "")):
    if fields.get(name) == default:
      del fields[name]
  key = json.dumps({"data": fields, "seed": seed, "extra": extra}, sort_keys=True, default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  name = os.path.basename(checkpoint) if checkpoint else "random_init"
  return os.path.join(model_dir, "features", f"{name}-{digest}.npz")


FEATURE_ARRAYS = ("train_features", "train_labels", "eval_features", "eval_labels")


def read_feature_cache(path, totals=(None, None)):
  """The four arrays of the feature cache at `path`, or None, with one warning line, when it is
  damaged (truncated, emptied, garbled: the zip's CRC-32 catches changed bytes) or holds other
  counts than `totals`: a cache is rebuilt, never trusted or fatal."""
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = tuple(z[k] for k in FEATURE_ARRAYS)
    counts = (len(arrays[0]), len(arrays[2]))
    if len(arrays[1]) != counts[0] or len(arrays[3]) != counts[1]:
      raise ValueError("features and labels of different lengths")
    if any(t is not None and t != c for t, c in zip(totals, counts)):
      raise ValueError(f"{counts[0]:,} + {counts[1]:,} images, not {totals[0]:,} + {totals[1]:,}")
  except Exception as e:  # noqa: BLE001 -- zipfile, pickle and numpy raise a dozen kinds
    md.warn_once(path, f"feature cache {path} is damaged ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:120]}); extracting the features again")
    return None
  return arrays


def cached_features(path, encoder, train_ds, eval_ds, name="encoder", totals=(None, None),
                    train_dtype=np.float32):
  """(train_features, train_labels, eval_features, eval_labels), read from `path` when it exists,
  else extracted with `encoder` and written there (atomically). `name` and `totals` (image counts
  of the two datasets) label the progress and size the preallocated arrays; `train_dtype`
  float16 halves the kNN bank (a cache of another dtype is converted on reading)."""
  if path and os.path.exists(path):
    cached = read_feature_cache(path, totals)
    if cached is not None:
      progress.say(f"features of the {name}: read from {path}")
      train_f, train_l, eval_f, eval_l = cached
      return train_f.astype(train_dtype, copy=False), train_l, eval_f, eval_l
  train_f, train_l = extract_features(encoder, train_ds, f"features of the {name}, training split",
                                      totals[0], train_dtype)
  eval_f, eval_l = extract_features(encoder, eval_ds, f"features of the {name}, eval split",
                                    totals[1])
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with md.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, train_features=train_f, train_labels=train_l, eval_features=eval_f,
               eval_labels=eval_l)
  return train_f, train_l, eval_f, eval_l
