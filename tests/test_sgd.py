"""--weight_decay_mode=coupled: PyTorch-style SGD (decay through the gradient, every variable)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from nnclr_tf import training
from nnclr_tf.config import OptimConfig
from nnclr_tf.sgd import CoupledSGD


def numpy_sgd(w, g, v, lr, momentum, wd):
  """torch.optim.SGD (dampening 0, no Nesterov): d = g + wd w; v = m v + d; w -= lr v."""
  d = g + wd * w
  v = momentum * v + d
  return w - lr * v, v


def _run(opt, variables, grads_per_step, lrs):
  for lr, grads in zip(lrs, grads_per_step):
    opt.learning_rate = lr
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])


def test_steps_match_numpy_with_momentum_and_a_changing_lr():
  rng = np.random.default_rng(0)
  shapes = [(5, 3), (3,)]  # a kernel and a bias: both are decayed
  w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(4)]
  lrs = [0.1, 0.3, 0.05, 0.2]
  variables = [keras.Variable(w) for w in w0]
  _run(CoupledSGD(momentum=0.9, weight_decay_rate=0.05), variables, grads, lrs)
  for i in range(len(shapes)):
    w, v = w0[i].astype(np.float64), np.zeros(shapes[i])
    for lr, gs in zip(lrs, grads):
      w, v = numpy_sgd(w, gs[i], v, lr, 0.9, 0.05)
    np.testing.assert_allclose(variables[i].numpy(), w, rtol=1e-5, atol=1e-6)


def test_differs_from_keras_decoupled_sgd():
  rng = np.random.default_rng(1)
  w0, g = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
  a, b = keras.Variable(w0), keras.Variable(w0)
  _run(CoupledSGD(momentum=0.9, weight_decay_rate=0.1), [a], [[g], [g]], [0.1, 0.1])
  _run(keras.optimizers.SGD(momentum=0.9, weight_decay=0.1), [b], [[g], [g]], [0.1, 0.1])
  assert not np.allclose(a.numpy(), b.numpy(), rtol=1e-4)


def test_checkpoint_resume_continues_exactly(tmp_path):
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(3, 3)).astype(np.float32)
  grads = [[rng.normal(size=(3, 3)).astype(np.float32)] for _ in range(4)]
  ref = keras.Variable(w0)
  ref_opt = CoupledSGD(momentum=0.9, weight_decay_rate=0.01)
  _run(ref_opt, [ref], grads, [0.1] * 4)
  first = keras.Variable(w0)
  opt = CoupledSGD(momentum=0.9, weight_decay_rate=0.01)
  _run(opt, [first], grads[:2], [0.1] * 2)
  path = tf.train.Checkpoint(w=first, optimizer=opt).save(str(tmp_path / "ckpt"))
  again = keras.Variable(np.zeros_like(w0))
  opt2 = CoupledSGD(momentum=0.9, weight_decay_rate=0.01)
  opt2.build([again])
  tf.train.Checkpoint(w=again, optimizer=opt2).restore(path).assert_consumed()
  assert int(opt2.iterations.numpy()) == 2
  _run(opt2, [again], grads[2:], [0.1] * 2)
  np.testing.assert_allclose(again.numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)


def test_two_replicas_apply_the_summed_gradient():
  """Under MirroredStrategy Keras sums the replicas' gradients; the update is that of the sum."""
  strategy = mirrored(2)
  rng = np.random.default_rng(3)
  w0 = rng.normal(size=(4, 2)).astype(np.float32)
  g = rng.normal(size=(2, 4, 2)).astype(np.float32)
  with strategy.scope():
    w = keras.Variable(w0)
    opt = CoupledSGD(learning_rate=0.2, momentum=0.9, weight_decay_rate=0.1)
    opt.build([w])

  @tf.function
  def step():
    local = tf.gather(tf.constant(g), tf.distribute.get_replica_context().replica_id_in_sync_group)
    opt.apply_gradients([(local, w)])

  nw, v = w0.astype(np.float64), np.zeros((4, 2))
  for _ in range(2):
    strategy.run(step)
    nw, v = numpy_sgd(nw, g[0] + g[1], v, 0.2, 0.9, 0.1)
  np.testing.assert_allclose(w.numpy(), nw, rtol=1e-5, atol=1e-6)


def _build(**kw):
  v = [keras.Variable(np.ones((2, 2), np.float32)), keras.Variable(np.ones(2, np.float32))]
  return training.build_optimizer(OptimConfig(**kw), v, 256, 10, 5)


def test_build_optimizer_modes_and_refusals():
  opt = _build(optimizer="sgd", weight_decay=5e-4, weight_decay_mode="coupled")
  assert isinstance(opt, CoupledSGD) and opt.weight_decay_rate == 5e-4
  assert type(_build(optimizer="sgd", weight_decay=5e-4)) is keras.optimizers.SGD
  for name in ("lars", "adamw"):
    with pytest.raises(training.ConfigError, match="--weight_decay_mode=coupled"):
      _build(optimizer=name, weight_decay_mode="coupled")
  with pytest.raises(training.ConfigError, match="--weight_decay_mode='l2'"):
    _build(optimizer="sgd", weight_decay_mode="l2")


def test_config_round_trip():
  again = CoupledSGD.from_config(CoupledSGD(momentum=0.8, weight_decay_rate=1e-4).get_config())
  assert (again.momentum, again.weight_decay_rate, again.weight_decay) == (0.8, 1e-4, None)
