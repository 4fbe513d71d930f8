import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from nnclr_tf.batchnorm import BatchNormalization


def _run(layer, x, w):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=True)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
  grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
  return [y.numpy().astype(np.float32)] + [g.numpy() for g in grads] + [
      layer.moving_mean.numpy(), layer.moving_variance.numpy()]


@pytest.mark.parametrize("shape", [(16, 5), (4, 6, 6, 3)])
def test_fused_training_pass_equals_keras(shape):
  """Oracle: keras.layers.BatchNormalization itself. Output, gradients w.r.t. input (through the
  batch statistics), gamma and beta, and the moving statistics (biased variance) all agree."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(2, 3, size=shape).astype(np.float32))
  w = tf.constant(rng.normal(size=shape).astype(np.float32))
  out = []
  for cls in (keras.layers.BatchNormalization, BatchNormalization):
    layer = cls(momentum=0.9, epsilon=1e-5, synchronized=True)
    layer.build(shape)
    layer.gamma.assign(np.linspace(0.5, 2, shape[-1]))
    layer.beta.assign(np.linspace(-1, 1, shape[-1]))
    out.append(_run(layer, x, w))
  for name, a, b in zip(["y", "dx", "dgamma", "dbeta", "mean", "var"], *out):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-5, err_msg=name)
  # The moving variance moved towards the biased batch variance.
  x2 = x.numpy().reshape(-1, shape[-1])
  np.testing.assert_allclose(out[1][5], 0.9 + 0.1 * x2.var(0), rtol=1e-5)


def test_inference_and_multi_replica_sync_use_keras_path():
  layer = BatchNormalization(synchronized=True)
  layer.build((4, 3))
  x = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))
  assert layer._can_fuse(x, True, None)
  assert not layer._can_fuse(x, False, None)
  strategy = mirrored(2)
  seen = []
  strategy.run(lambda: seen.append(layer._can_fuse(x, True, None)))
  assert seen and not any(seen)  # global BN across replicas needs the all-reduced moments
  np.testing.assert_allclose(layer(x, training=False).numpy(),
                             x.numpy() / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_mixed_precision_output_dtype():
  layer = BatchNormalization(dtype="mixed_bfloat16")
  x = tf.cast(tf.random.stateless_normal([8, 4], seed=[1, 2]), tf.bfloat16)
  y = layer(x, training=True)
  assert y.dtype == tf.bfloat16
  ref = keras.layers.BatchNormalization(dtype="mixed_bfloat16")(x, training=True)
  np.testing.assert_allclose(y.numpy().astype(np.float32), ref.numpy().astype(np.float32),
                             atol=0.02)
