import keras
import numpy as np
import pytest
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


def numpy_lars_clip(w, g, v, lr, momentum, eta, wd, excluded):
  """LARC clip, PyTorch momentum: g' = (g + wd w) min(trust / lr, 1); v = m v + g'; w -= lr v.
  Returns (w, v, which bound was active: 'trust', 'lr' or None)."""
  active = None
  if not excluded:
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    g = g + wd * w
    if wn > 0 and gn > 0:
      trust = eta * wn / (gn + wd * wn)
      active = "trust" if trust < lr else "lr"
      g = g * min(trust / lr, 1.0)
  v = momentum * v + g
  return w - lr * v, v, active


def test_clip_mode_matches_numpy_over_a_changing_lr():
  rng = np.random.default_rng(3)
  w0 = rng.normal(size=(6, 4)).astype(np.float32)
  b0 = rng.normal(size=(4,)).astype(np.float32)
  w, b = keras.Variable(w0), keras.Variable(b0)
  eta, wd, m = 0.02, 1e-2, 0.9
  opt = LARS(learning_rate=1.0, momentum=m, eta=eta, weight_decay_rate=wd, clip_lr=True)
  nw, nb = w0.astype(np.float64), b0.astype(np.float64)
  vw, vb = np.zeros_like(nw), np.zeros_like(nb)
  # Warm-up from tiny lrs (lr < trust: plain SGD) to large ones (trust < lr: clipped), then down.
  lrs = [1e-4, 1e-3, 0.5, 2.0, 0.01, 1.0]
  seen = []
  for lr in lrs:
    opt.learning_rate = lr
    gw = rng.normal(size=w0.shape).astype(np.float32)
    gb = rng.normal(size=b0.shape).astype(np.float32)
    opt.apply_gradients([(tf.constant(gw), w), (tf.constant(gb), b)])
    nw, vw, active = numpy_lars_clip(nw, gw, vw, lr, m, eta, wd, excluded=False)
    nb, vb, _ = numpy_lars_clip(nb, gb, vb, lr, m, eta, wd, excluded=True)
    seen.append(active)
    np.testing.assert_allclose(w.numpy(), nw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), nb, rtol=1e-5, atol=1e-6)
  assert seen[:2] == ["lr", "lr"] and "trust" in seen[2:]  # both regimes were exercised


def test_clip_mode_is_plain_sgd_while_lr_is_below_trust():
  rng = np.random.default_rng(4)
  w0 = rng.normal(size=(5, 5)).astype(np.float32)
  g0 = rng.normal(size=(5, 5)).astype(np.float32)
  w = keras.Variable(w0)
  lr, wd = 1e-4, 1e-3  # trust = 0.02 * ||w|| / (||g|| + wd ||w||) ~ 0.02 >> lr
  opt = LARS(learning_rate=lr, momentum=0.9, eta=0.02, weight_decay_rate=wd, clip_lr=True)
  opt.apply_gradients([(tf.constant(g0), w)])
  np.testing.assert_allclose(w.numpy(), w0 - lr * (g0 + wd * w0), rtol=1e-6, atol=1e-8)
  # The default mode at the same lr would scale the step by trust instead.
  w2 = keras.Variable(w0)
  LARS(learning_rate=lr, momentum=0.9, eta=0.02, weight_decay_rate=wd).apply_gradients(
      [(tf.constant(g0), w2)])
  assert not np.allclose(w2.numpy(), w.numpy(), rtol=1e-6, atol=1e-8)


def test_clip_mode_zero_weights_and_zero_lr():
  w = keras.Variable(np.zeros((2, 2), np.float32))
  opt = LARS(learning_rate=0.1, momentum=0.5, eta=0.001, weight_decay_rate=0.1, clip_lr=True)
  opt.apply_gradients([(tf.ones((2, 2)), w)])  # ||w|| = 0: no trust ratio, plain SGD
  np.testing.assert_allclose(w.numpy(), -0.1 * np.ones((2, 2)), rtol=1e-6)
  opt.learning_rate = 0.0
  opt.apply_gradients([(tf.ones((2, 2)), w)])  # lr = 0: no step, and nothing turns NaN
  np.testing.assert_allclose(w.numpy(), -0.1 * np.ones((2, 2)), rtol=1e-6)
  assert np.all(np.isfinite(opt.variables[-1].numpy()))


def test_clip_mode_config_round_trip():
  opt = LARS(learning_rate=0.4, eta=0.02, weight_decay_rate=1e-5, clip_lr=True)
  assert LARS.from_config(opt.get_config()).clip_lr is True
  assert LARS.from_config(LARS().get_config()).clip_lr is False


def test_build_optimizer_wires_and_guards_clip_mode():
  from nnclr_tf import training
  from nnclr_tf.config import OptimConfig
  v = [keras.Variable(np.ones((2, 2), np.float32))]
  assert training.build_optimizer(OptimConfig(lars_clip_lr=True), v, 256, 10, 5).clip_lr is True
  assert training.build_optimizer(OptimConfig(), v, 256, 10, 5).clip_lr is False
  with pytest.raises(training.ConfigError, match="--lars_clip_lr"):
    training.build_optimizer(OptimConfig(optimizer="sgd", lars_clip_lr=True), v, 256, 10, 5)
