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
  nn_local = tf.cast(nn_local, tf.float32)
  p_global = tf.cast(p_global, tf.float32)
  logits = tf.matmul(nn_local, p_global, transpose_b=True) / temperature
  b = tf.shape(nn_local)[0]
  labels = tf.range(b, dtype=tf.int32) + tf.cast(label_offset, tf.int32)
  per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  return tf.reduce_mean(per_row), logits, labels
