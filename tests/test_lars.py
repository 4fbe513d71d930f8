import keras
import numpy as np
import tensorflow as tf

from nnclr_tf.lars import LARS, is_excluded


def numpy_lars(w, g, v, lr, momentum, eta, wd, excluded):
  if not excluded:
    g = g + wd * w
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
    lr = lr * trust
  v = momentum * v + lr * g
  return w - v, v


def test_two_steps_match_numpy_with_exclusions():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  w, b = keras.Variable(w0), keras.Variable(b0)
  opt = LARS(learning_rate=0.5, momentum=0.9, eta=0.01, weight_decay_rate=0.1)
  nw, nb = w0.astype(np.float64), b0.astype(np.float64)
  vw, vb = np.zeros_like(nw), np.zeros_like(nb)
  for _ in range(2):
    gw = rng.normal(size=w0.shape).astype(np.float32)
    gb = rng.normal(size=b0.shape).astype(np.float32)
    opt.apply_gradients([(tf.constant(gw), w), (tf.constant(gb), b)])
    nw, vw = numpy_lars(nw, gw, vw, 0.5, 0.9, 0.01, 0.1, excluded=False)
    nb, vb = numpy_lars(nb, gb, vb, 0.5, 0.9, 0.01, 0.1, excluded=True)
  np.testing.assert_allclose(w.numpy(), nw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b.numpy(), nb, rtol=1e-5, atol=1e-6)


def test_exclusion_is_by_rank():
  assert is_excluded(keras.Variable(np.zeros(4, np.float32)))
  assert is_excluded(keras.Variable(np.float32(1)))
  assert not is_excluded(keras.Variable(np.zeros((2, 2), np.float32)))


def test_zero_weights_use_trust_one():
  w = keras.Variable(np.zeros((2, 2), np.float32))
  opt = LARS(learning_rate=0.1, momentum=0.0, eta=0.001, weight_decay_rate=0.0)
  opt.apply_gradients([(tf.ones((2, 2)), w)])
  np.testing.assert_allclose(w.numpy(), -0.1 * np.ones((2, 2)), rtol=1e-6)


def test_config_round_trip():
  opt = LARS(learning_rate=0.2, momentum=0.8, eta=0.002, weight_decay_rate=1e-5)
  again = LARS.from_config(opt.get_config())
  assert (again.momentum, again.eta, again.weight_decay_rate) == (0.8, 0.002, 1e-5)
  assert again.weight_decay is None  # decay is applied inside the update, not again by the base
