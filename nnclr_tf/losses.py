"""The NNCLR contrastive loss. Pure: no state is read or written here."""

from __future__ import annotations

import tensorflow as tf


def nnclr_loss(nn_local, p_global, temperature, label_offset=0, symmetric=False, nn_global=None,
               p_local=None):
  """InfoNCE with the support-set neighbour as the positive (NNCLR paper, Eq. 2):

    L_i = -log( exp(NN(z1_i) . p2_i / t) / sum_k exp(NN(z1_i) . p2_k / t) )

  With `symmetric=True` (paper, Sec. 3.2) the loss is the mean of that row term and the column
  term, where each prediction picks its own neighbour out of the batch's neighbours:

    C_i = -log( exp(NN(z1_i) . p2_i / t) / sum_k exp(NN(z1_k) . p2_i / t) )

  Each replica scores its local predictions against the global batch's neighbours, so the mean
  of the replicas' losses is the loss of the global batch, whatever the replica count.

  Args:
    nn_local: [b, d] L2-normalised nearest neighbours of this replica's rows (constants).
    p_global: [B, d] L2-normalised predictions of the *global* batch (all replicas, in replica
      order); the k in the denominator runs over all of them, so negatives span replicas.
    temperature: t > 0.
    label_offset: index of this replica's first row in the global batch (replica_id * b).
    symmetric: add the column term.
    nn_global: [B, d] the global batch's neighbours, in replica order (symmetric only).
    p_local: [b, d] this replica's predictions, the rows of p_global at label_offset (symmetric
      only; passed apart so their gradient does not make a round trip through the all-gather).

  Returns:
    (mean loss over the local rows, row-term logits [b, B], labels [b]).
  """
  # Logits and loss in float32 under mixed precision: at t = 0.1 the logits span [-10, 10], where
  # bfloat16 is spaced 0.0625 (float16 0.008), too coarse to rank the positive against thousands
  # of near negatives; the softmax and the gradient back into p inherit that error.
  nn_local = tf.cast(nn_local, tf.float32)
  p_global = tf.cast(p_global, tf.float32)
  logits = tf.matmul(nn_local, p_global, transpose_b=True) / temperature
  b = tf.shape(nn_local)[0]
  labels = tf.range(b, dtype=tf.int32) + tf.cast(label_offset, tf.int32)
  loss = tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
  if symmetric:
    if nn_global is None or p_local is None:
      raise ValueError("symmetric=True needs nn_global and p_local")
    p_local = tf.cast(p_local, tf.float32)
    nn_global = tf.cast(nn_global, tf.float32)
    col_logits = tf.matmul(p_local, nn_global, transpose_b=True) / temperature
    col = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=col_logits))
    loss = 0.5 * (loss + col)
  return loss, logits, labels
