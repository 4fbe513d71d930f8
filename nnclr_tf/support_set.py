"""The support set: a FIFO ring buffer of past embeddings (NNCLR paper, Sec. 3.1).

Two explicit steps per training step, in this order:
  1. `nearest_neighbour(z)` reads the queue as it was *before* this step;
  2. `update(z_global, labels_global)` enqueues the global batch after the loss.

The variables are created with ONLY_FIRST_REPLICA aggregation: every replica computes the same
update from the all-gathered batch, and the strategy keeps one consistent copy. Shapes are static
(the write is a scatter of `global_batch` rows at the pointer), so the step compiles under XLA.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class RandomUnitVectors(keras.initializers.Initializer):
  """Rows drawn from N(0, I) and L2-normalised: uniform on the unit sphere."""

  def __init__(self, seed=0):
    self.seed = seed

  def __call__(self, shape, dtype=None):
    x = tf.random.stateless_normal(shape, seed=[self.seed, 0x5E7], dtype=tf.float32)
    return tf.cast(tf.math.l2_normalize(x, axis=-1), dtype or tf.float32)

  def get_config(self):
    return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class SupportSet(keras.layers.Layer):
  """Ring buffer of `size` L2-normalised `dim`-vectors, their labels (-1: unknown) and a pointer."""

  def __init__(self, size, dim, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.size = int(size)
    self.dim = int(dim)
    self.seed = int(seed)
    # float32 under any mixed-precision policy (autocast=False, and queries are cast up in
    # `similarities`): bfloat16 keeps 8 significant bits, so cosine similarities near 1 would be
    # resolved only to ~0.004, coarser than the gaps between a query's best candidates in a
    # 98,304-row queue, and argmax would pick among ties. Memory is 4 bytes x size x dim.
    common = dict(trainable=False, autocast=False, aggregation="only_first_replica")
    self.embeddings = self.add_weight(shape=(self.size, self.dim), dtype="float32",
                                      initializer=RandomUnitVectors(self.seed),
                                      name="embeddings", **common)
    self.labels = self.add_weight(shape=(self.size,), dtype="int32",
                                  initializer=keras.initializers.Constant(-1), name="labels",
                                  **common)
    self.pointer = self.add_weight(shape=(), dtype="int32", initializer="zeros", name="pointer",
                                   **common)
    self.built = True

  def similarities(self, z):
    """Cosine similarities [b, size] of L2-normalised queries `z` with the queue (one matmul)."""
    return tf.matmul(tf.cast(z, tf.float32), tf.convert_to_tensor(self.embeddings),
                     transpose_b=True)

  def nearest_neighbour(self, z, k=1, choice=None):
    """NN(z, Q): the queue row most cosine-similar to each row of `z`.

    With k > 1, `choice` ([b] ints in [0, k)) picks among the top-k (the paper's ablation samples
    uniformly; the caller draws `choice` so that the draw does not depend on the replica count).
    Returns (neighbours [b, dim] as constants, their queue indices [b]).
    """
    sims = self.similarities(z)
    if k == 1:
      idx = tf.argmax(sims, axis=1, output_type=tf.int32)
    else:
      _, top = tf.math.top_k(sims, k=k)
      idx = tf.gather(top, choice, axis=1, batch_dims=1)
    nn = tf.gather(tf.convert_to_tensor(self.embeddings), idx)
    return tf.stop_gradient(nn), idx

  def neighbour_labels(self, idx):
    return tf.gather(tf.convert_to_tensor(self.labels), idx)

  def update(self, z_global, labels_global=None):
    """Writes the global batch at the pointer (FIFO) and advances it. size % batch must be 0."""
    batch = z_global.shape[0]
    if batch is None or self.size % batch:
      raise ValueError(f"queue size {self.size} must be a multiple of the global batch {batch}")
    start = tf.convert_to_tensor(self.pointer)
    indices = start + tf.range(batch, dtype=tf.int32)
    z_global = tf.stop_gradient(tf.cast(z_global, tf.float32))
    self.embeddings.value.scatter_update(tf.IndexedSlices(z_global, indices))
    if labels_global is None:
      labels_global = tf.fill([batch], -1)
    self.labels.value.scatter_update(tf.IndexedSlices(tf.cast(labels_global, tf.int32), indices))
    self.pointer.assign((start + batch) % self.size)

  def get_config(self):
    return {**super().get_config(), "size": self.size, "dim": self.dim, "seed": self.seed}
