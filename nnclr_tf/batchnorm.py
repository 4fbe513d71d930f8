"""BatchNormalization whose training pass is one fused op when no cross-replica statistics are
needed.

Keras 3's BatchNormalization never uses TensorFlow's fused kernel: in training it computes the
moments with separate reductions (with `synchronized=True` also a full-size `ones_like` tensor to
count elements) and normalises with several element-wise ops, each a pass over the activation,
and as many again in the backward pass. On CPU these passes cost a measurable share of a ResNet
step (benchmarks/RESULTS.md). When the batch statistics are this replica's own (one replica, or
`synchronized=False`) the same function is computed by FusedBatchNormV3: one op forward, one op
backward, with the gradient through the batch statistics included. Across several replicas with
`synchronized=True` (global BN, the paper's setting) the statistics must be all-reduced, and the
layer falls back to Keras's implementation.

Semantics are Keras's: normalisation with the biased batch variance, moving statistics updated
with the biased variance (the fused op returns the unbiased one, so it is rescaled), statistics
computed in float32 under mixed precision, output cast to the compute dtype. Variables, names and
config are those of keras.layers.BatchNormalization, so checkpoints are interchangeable.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="nnclr_tf")
class BatchNormalization(keras.layers.BatchNormalization):

  def _can_fuse(self, inputs, training, mask):
    if not training or not self.trainable or mask is not None or self.renorm:
      return False
    rank = len(inputs.shape)
    if rank not in (2, 4) or self.axis % rank != rank - 1 or inputs.shape[-1] is None:
      return False
    if self.synchronized:
      ctx = tf.distribute.get_replica_context()
      if ctx is not None and ctx.num_replicas_in_sync > 1:
        return False
    return True

  def call(self, inputs, training=None, mask=None):
    if not self._can_fuse(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    x = tf.cast(inputs, tf.float32)
    x4 = x if len(inputs.shape) == 4 else tf.reshape(x, [-1, 1, 1, channels])
    gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
    beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
    empty = tf.constant([], tf.float32)
    y, mean, unbiased_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The op reports the Bessel-corrected variance; Keras tracks the biased one.
    n = tf.cast(tf.size(x4) // channels, tf.float32)
    variance = unbiased_var * ((n - 1.0) / tf.maximum(n, 1.0))
    mean = tf.stop_gradient(mean)
    variance = tf.stop_gradient(variance)
    self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * self.momentum +
                            mean * (1.0 - self.momentum))
    self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * self.momentum +
                                variance * (1.0 - self.momentum))
    if len(inputs.shape) == 2:
      y = tf.reshape(y, [-1, channels])
    return tf.cast(y, self.compute_dtype)
