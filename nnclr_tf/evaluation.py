"""Evaluation of a representation: feature extraction and weighted kNN (Wu et al. 2018, InstDisc).

kNN: cosine similarity between L2-normalised features; the k most similar training examples vote for
their class with weight exp(s / T); the class with the largest sum wins.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf


def extract_features(encoder, dataset, name="features", total=None):
  """Runs `encoder(images, training=False)` over a dataset of (images, labels) batches; `name`
  and `total` (images, if known) label its progress (nnclr_tf.progress)."""
  from nnclr_tf import progress

  @tf.function(reduce_retracing=True)
  def forward(x):
    return tf.cast(encoder(x, training=False), tf.float32)

  feats, labels = [], []
  with progress.stage(name, total) as bar:
    for x, y in dataset:
      feats.append(forward(x).numpy())
      labels.append(y.numpy())
      bar.update(len(labels[-1]))
  return np.concatenate(feats), np.concatenate(labels)


def knn_batch_size(num_train, budget_mb=256):
  """Queries per batch so that the [batch, num_train] similarity matrix (and top_k's copy of it)
  stay within `budget_mb`: 50,000 train rows -> 671 queries (~128 MB per matrix)."""
  return int(max(1, min(1024, budget_mb * 2 ** 20 // (8 * max(num_train, 1)))))


def knn_scores(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1,
               batch_size=None):
  """Class scores [n_query, num_classes].

  Memory is O(n_train x D) for the normalised train features plus O(batch_size x n_train) for one
  batch of similarities; votes are summed with a segment sum ([batch, k] values), never a
  [batch, k, num_classes] one-hot, so 1,000 classes cost no more than 10.
  50,000 x 10,000 queries at D=512 add ~0.2 GB to the process (benchmarks/knn_memory.py).
  """
  train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
  train_labels = tf.constant(train_labels, tf.int32)
  k = min(k, int(train.shape[0]))
  batch_size = batch_size or knn_batch_size(int(train.shape[0]))

  @tf.function(reduce_retracing=True)
  def score(q):
    sims = tf.matmul(tf.math.l2_normalize(q, axis=1), train, transpose_b=True)
    top_s, top_i = tf.math.top_k(sims, k=k)
    weights = tf.exp(top_s / temperature)
    rows = tf.shape(q)[0]
    # Flat class slot row * C + label for every (query, neighbour) pair.
    slots = tf.gather(train_labels, top_i) + tf.range(rows)[:, None] * num_classes
    votes = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(slots, [-1]),
                                         rows * num_classes)
    return tf.reshape(votes, [rows, num_classes])

  from nnclr_tf import progress
  out = []
  with progress.stage(f"kNN (k={k}) over {int(train.shape[0]):,} training features",
                      len(query_features), "queries") as bar:
    for i in range(0, len(query_features), batch_size):
      out.append(score(tf.constant(query_features[i:i + batch_size], tf.float32)).numpy())
      bar.update(len(out[-1]))
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores, labels, k):
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def knn_eval(encoder, train_ds, eval_ds, num_classes, k=200, temperature=0.1):
  """{"knn_top1", "knn_top5"} of `encoder`'s features: eval split queried against train split."""
  train_f, train_l = extract_features(encoder, train_ds, "features of the training split")
  eval_f, eval_l = extract_features(encoder, eval_ds, "features of the eval split")
  return knn_eval_features(train_f, train_l, eval_f, eval_l, num_classes, k, temperature)


def knn_eval_features(train_f, train_l, eval_f, eval_l, num_classes, k=200, temperature=0.1):
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
  import dataclasses
  import hashlib
  import json
  fields = dataclasses.asdict(data_cfg)
  # The default crop fraction gives the features cached before the field existed: same key.
  if fields.get("eval_crop_fraction") == 1.0:
    del fields["eval_crop_fraction"]
  key = json.dumps({"data": fields, "seed": seed, "extra": extra}, sort_keys=True, default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  name = os.path.basename(checkpoint) if checkpoint else "random_init"
  return os.path.join(model_dir, "features", f"{name}-{digest}.npz")


def cached_features(path, encoder, train_ds, eval_ds, name="encoder", totals=(None, None)):
  """(train_features, train_labels, eval_features, eval_labels), read from `path` when it exists,
  else extracted with `encoder` and written there (atomically). `name` and `totals` (image counts
  of the two datasets) label the progress."""
  from nnclr_tf import progress
  if path and os.path.exists(path):
    progress.say(f"features of the {name}: read from {path}")
    with np.load(path) as z:
      return z["train_features"], z["train_labels"], z["eval_features"], z["eval_labels"]
  train_f, train_l = extract_features(encoder, train_ds, f"features of the {name}, training split",
                                      totals[0])
  eval_f, eval_l = extract_features(encoder, eval_ds, f"features of the {name}, eval split",
                                    totals[1])
  if path:
    import tempfile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A private temporary name: several workers may write the same (identical) cache at once.
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
      np.savez(f, train_features=train_f, train_labels=train_l, eval_features=eval_f,
               eval_labels=eval_l)
    os.replace(tmp, path)
  return train_f, train_l, eval_f, eval_l
