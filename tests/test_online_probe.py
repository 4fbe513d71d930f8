"""The online linear probe in NNCLR.train_step (model.py): it learns from labelled rows only and
leaves the pretraining (encoder/heads gradients, optimizer, support set) exactly as without it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from nnclr_tf import checkpoints
from nnclr_tf.model import NNCLR

TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64, temperature=0.1)


def build(strategy=None, seed=3, **kw):
  keras.utils.set_random_seed(seed)
  with (strategy or tf.distribute.get_strategy()).scope():
    return NNCLR(seed=seed, **{**TINY, **kw})


def batch(n=8, seed=0, unknown=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  labels[:unknown] = -1
  return {"view1": tf.constant(rng.uniform(size=(n, 16, 16, 3)).astype(np.float32)),
          "view2": tf.constant(rng.uniform(size=(n, 16, 16, 3)).astype(np.float32)),
          "label": tf.constant(labels)}


def weights(model):
  return {v.path: v.numpy().copy() for v in model.weights if "online_probe" not in v.path}


def test_probe_leaves_encoder_gradients_unchanged():
  """With plain SGD (lr 1, no momentum) one step moves every weight by exactly minus its
  gradient, so equal updates with and without the probe mean equal gradients."""
  plain, probed = build(), build(online_probe_classes=10)
  assert [v.path for v in plain.trainable_variables] == \
         [v.path for v in probed.trainable_variables]
  before = weights(plain)
  for k, v in weights(probed).items():
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  probe_before = probed.online_probe.kernel.numpy().copy()
  for m in (plain, probed):
    m.compile(optimizer=keras.optimizers.SGD(1.0))
    m.train_step(batch(unknown=3))
  a, b = weights(plain), weights(probed)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-7, err_msg=k)
  enc = [k for k in a if "conv1/kernel" in k][0]
  assert np.abs(a[enc] - before[enc]).max() > 1e-4          # the encoder did get a gradient
  assert np.abs(probed.online_probe.kernel.numpy() - probe_before).max() > 1e-5  # probe learnt
  assert int(probed.probe_optimizer.iterations.numpy()) == 1
  assert int(probed.optimizer.iterations.numpy()) == 1


def _sgd_probe(model):
  model.probe_optimizer = keras.optimizers.SGD(1.0)
  model.probe_optimizer.build(model.online_probe.weights)


def test_probe_gradient_is_the_masked_mean_cross_entropy():
  """Oracle: d/dW of mean over labelled rows of CE(softmax(xW + b), y) = X^T (P - Y) / n_labelled;
  rows with label -1 contribute nothing. SGD lr 1 makes the update minus that gradient."""
  model = build(online_probe_classes=4)
  _sgd_probe(model)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, model.online_probe.kernel.shape[0])).astype(np.float32)
  y = np.array([0, 1, 2, 3, -1, -1, 1, 2, -1, 0], np.int32)
  w0, b0 = model.online_probe.kernel.numpy().copy(), model.online_probe.bias.numpy().copy()
  model._probe_step(tf.constant(x), tf.constant(y))
  keep = y >= 0
  logits = x[keep] @ w0 + b0
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(4)[y[keep]]
  gw = x[keep].T @ (p - onehot) / keep.sum()
  gb = (p - onehot).sum(0) / keep.sum()
  np.testing.assert_allclose(w0 - model.online_probe.kernel.numpy(), gw, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b0 - model.online_probe.bias.numpy(), gb, rtol=1e-4, atol=1e-6)
  ce = -np.log(p[np.arange(keep.sum()), y[keep]])
  assert float(model.probe_loss_tracker.result()) == pytest.approx(ce.mean(), rel=1e-5)
  assert float(model.probe_acc_tracker.result()) == pytest.approx(
      np.mean(logits.argmax(1) == y[keep]))


def test_probe_update_is_replica_invariant(replicas=2):
  """Two replicas with unequal numbers of labelled rows make the same update as one replica on
  the concatenated batch: the loss is normalised by the GLOBAL labelled count."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(12, 32)).astype(np.float32)
  y = np.array([0, 1, 2, -1, -1, -1, 3, 1, 2, 0, -1, 2], np.int32)  # 3 vs 5 labelled rows
  one = build(online_probe_classes=4)
  _sgd_probe(one)
  one._probe_step(tf.constant(x), tf.constant(y))
  strategy = mirrored(replicas)
  many = build(strategy, online_probe_classes=4)
  with strategy.scope():
    _sgd_probe(many)
  part = len(x) // replicas
  xs = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * part:][:part]))
  ys = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(y[ctx.replica_id_in_sync_group * part:][:part]))
  tf.function(lambda a, b: strategy.run(many._probe_step, (a, b)))(xs, ys)
  for a, b in zip(one.online_probe.weights, many.online_probe.weights):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_probe_and_its_optimizer_are_checkpointed(tmp_path):
  """A resumed run restores the probe and its Adam slots, and a model with the probe matches a
  checkpoint of one with the probe (training.restore_latest asserts every object matched)."""
  model = build(online_probe_classes=10)
  model.compile(optimizer=keras.optimizers.SGD(0.1))
  model.optimizer.build(model.trainable_variables)
  for i in range(2):
    model.train_step(batch(seed=i))
  tf.train.CheckpointManager(checkpoints.make_checkpoint(model), str(tmp_path), 1).save(2)
  again = build(seed=9, online_probe_classes=10)
  again.compile(optimizer=keras.optimizers.SGD(0.1))
  again.optimizer.build(again.trainable_variables)
  assert checkpoints.restore_latest(again, str(tmp_path))
  pairs = list(zip(model.online_probe.weights + model.probe_optimizer.variables,
                   again.online_probe.weights + again.probe_optimizer.variables))
  assert len(pairs) == 2 + 2 + 2 * 2  # kernel, bias; iterations, lr; Adam m and v per weight
  for a, b in pairs:
    np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
  assert int(again.probe_optimizer.iterations.numpy()) == 2


def test_probe_round_trips_through_the_keras_format(tmp_path):
  model = build(online_probe_classes=10)
  model.compile(optimizer=keras.optimizers.SGD(0.1))
  model.train_step(batch())
  model.save(str(tmp_path / "m.keras"))
  back = keras.models.load_model(str(tmp_path / "m.keras"))
  assert back.get_config()["online_probe_classes"] == 10
  for a, b in zip(model.online_probe.weights + model.probe_optimizer.variables,
                  back.online_probe.weights + back.probe_optimizer.variables):
    np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
