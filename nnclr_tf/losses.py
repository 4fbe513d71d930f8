"""The NNCLR contrastive loss. Pure: no state is read or written here."""

from __future__ import annotations

import tensorflow as tf


def nnclr_loss(nn_local, p_global, temperature, label_offset=0):
  """InfoNCE with the support-set neighbour as the positive (NNCLR paper, Eq. 2):

    L_i = -log( exp(NN(z1_i) . p2_i / t) / sum_k exp(NN(z1_i) . p2_k / t) )

  Args:
    nn_local: [b, d] L2-normalised nearest neighbours of this replica's rows (constants).
    p_global: [B, d] L2-normalised predictions of the *global* batch (all replicas, in replica
      order); the k in the denominator runs over all of them, so negatives span replicas.
    temperature: t > 0.
    label_offset: index of this replica's first row in the global batch (replica_id * b).

  Returns:
    (mean loss over the local rows, logits [b, B], labels [b]).
  """
  # Logits and loss in float32 under mixed precision: at t = 0.1 the logits span [-10, 10], where
  # bfloat16 is spaced 0.0625 (float16 0.008), too coarse to rank the positive against thousands
  # of near negatives; the softmax and the gradient back into p inherit that error.
  nn_local = tf.cast(nn_local, tf.float32)
  p_global = tf.cast(p_global, tf.float32)
  logits = tf.matmul(nn_local, p_global, transpose_b=True) / temperature
  b = tf.shape(nn_local)[0]
  labels = tf.range(b, dtype=tf.int32) + tf.cast(label_offset, tf.int32)
  per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  return tf.reduce_mean(per_row), logits, labels
