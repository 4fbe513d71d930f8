"""Evaluation of a representation: feature extraction and weighted kNN (Wu et al. 2018, InstDisc).

kNN: cosine similarity between L2-normalised features; the k most similar training examples vote for
their class with weight exp(s / T); the class with the largest sum wins.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def extract_features(encoder, dataset):
  """Runs `encoder(images, training=False)` over a dataset of (images, labels) batches."""

  @tf.function(reduce_retracing=True)
  def forward(x):
    return tf.cast(encoder(x, training=False), tf.float32)

  feats, labels = [], []
  for x, y in dataset:
    feats.append(forward(x).numpy())
    labels.append(y.numpy())
  return np.concatenate(feats), np.concatenate(labels)


def knn_scores(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1,
               batch_size=1024):
  """Class scores [n_query, num_classes]; queries are processed in batches so that memory is
  O(batch_size x n_train), e.g. 1024 x 50,000 floats = 200 MB."""
  train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
  train_labels = tf.constant(train_labels, tf.int32)
  k = min(k, int(train.shape[0]))

  @tf.function
  def score(q):
    sims = tf.matmul(tf.math.l2_normalize(q, axis=1), train, transpose_b=True)
    top_s, top_i = tf.math.top_k(sims, k=k)
    weights = tf.exp(top_s / temperature)
    votes = tf.one_hot(tf.gather(train_labels, top_i), num_classes) * weights[..., None]
    return tf.reduce_sum(votes, axis=1)

  out = [score(tf.constant(query_features[i:i + batch_size], tf.float32)).numpy()
         for i in range(0, len(query_features), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores, labels, k):
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def knn_eval(encoder, train_ds, eval_ds, num_classes, k=200, temperature=0.1):
  """{"knn_top1", "knn_top5"} of `encoder`'s features: eval split queried against train split."""
  train_f, train_l = extract_features(encoder, train_ds)
  eval_f, eval_l = extract_features(encoder, eval_ds)
  scores = knn_scores(train_f, train_l, eval_f, num_classes, k, temperature)
  return {"knn_top1": topk_accuracy(scores, eval_l, 1), "knn_top5": topk_accuracy(scores, eval_l, 5)}
