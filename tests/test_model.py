import keras
import numpy as np
import pytest
import tensorflow as tf

import tolerances
from conftest import mirrored
from nnclr_tf import checkpoints, data, training
from nnclr_tf.checks import check_batch
from nnclr_tf.config import AugmentConfig, DataConfig, OptimConfig, TrainConfig
from nnclr_tf.errors import ConfigError
from nnclr_tf.model import NNCLR

AUG = AugmentConfig(flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0),
                    solarize_prob=(0, 0), crop_scale=(0.4, 1.0))
TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64, temperature=0.1)


def build(strategy, seed=7, **kw):
  keras.utils.set_random_seed(seed)
  with strategy.scope():
    return NNCLR(seed=seed, **{**TINY, **kw})


def train_steps(model, strategy, model_dir, steps=3, optimizer="lars", batch=16, seed=7):
  train, _ = data.load_sources(DataConfig(dataset="digits"))
  return training.pretrain(
      model, strategy, train, DataConfig(image_size=16), AUG,
      TrainConfig(model_dir=str(model_dir), batch_size=batch, train_steps=steps, seed=seed,
                  verbose=0),
      OptimConfig(optimizer=optimizer, learning_rate=0.5, weight_decay=1e-4, warmup_epochs=0))


def state(model):
  return {v.path: np.array(v.numpy()) for v in model.weights}


@pytest.fixture(scope="module")
def one_and_two_replicas(tmp_path_factory):
  """3 steps from the same initial state on 1 and on 2 replicas: (init, one, two), the last two
  as (results, state, model)."""
  s1, s2 = mirrored(1), mirrored(2)
  one, two = build(s1), build(s2)
  init = state(one)
  r1 = train_steps(one, s1, tmp_path_factory.mktemp("one"))
  r2 = train_steps(two, s2, tmp_path_factory.mktemp("two"))
  return init, (r1, state(one), one), (r2, state(two), two)


@pytest.mark.slow
def test_replicas_match_one_replica(one_and_two_replicas, record_property):
  """Same global batch and seed: 1 vs 2 logical CPU replicas give the same loss, weights (incl.
  synchronised BN moving statistics) and support set after 3 steps, up to cross-kernel rounding
  (tolerances.py). (4 replicas: test_run.py, in subprocesses, since TF's collective group keys
  are per process.)"""
  init, (r1, a, one), (r2, b, two) = one_and_two_replicas
  record_property("loss_gap", tolerances.loss_gap(r1["final_loss"], r2["final_loss"]))
  tolerances.assert_loss_close(r1["final_loss"], r2["final_loss"])
  record_property("divergence", tolerances.divergence(init, a, b))
  tolerances.assert_trained_close(init, a, b)
  assert int(two.support_set.pointer.numpy()) == 48
  np.testing.assert_array_equal(two.support_set.labels.numpy(), one.support_set.labels.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("mutation,replicas", [
    (tolerances.break_lookup, 1), (tolerances.skip_enqueue, 1), (tolerances.misplace_enqueue, 1),
    (tolerances.drop_replica_1_gradient, 2)], ids=lambda x: getattr(x, "__name__", str(x)))
def test_replica_comparison_catches_a_broken_step(one_and_two_replicas, mutation, replicas,
                                                  monkeypatch, tmp_path, record_property):
  """The tolerance of the 1 = 2 replica comparison cannot hide a bug in one of the two runs: a
  broken lookup or enqueue on one replica, or replica 1's gradient lost on two, lands >= 10 x
  FRAC from the other run."""
  init, one, two = one_and_two_replicas
  strategy = mirrored(replicas)
  model = build(strategy)
  mutation(monkeypatch)
  train_steps(model, strategy, tmp_path)
  reference = two[1] if replicas == 1 else one[1]
  worst = tolerances.worst(init, reference, state(model))
  record_property("worst", worst)
  assert worst >= 10 * tolerances.FRAC


def test_training_changes_weights_and_fills_queue_fifo(tmp_path):
  strategy = tf.distribute.get_strategy()
  model = build(strategy)
  before = state(model)
  q0 = model.support_set.embeddings.numpy().copy()
  train_steps(model, strategy, tmp_path, steps=5)
  after = state(model)
  enc = [k for k in before if "conv1/kernel" in k][0]
  assert not np.allclose(before[enc], after[enc])
  q = model.support_set.embeddings.numpy()
  # 5 steps x 16 = 80 rows into a 64-queue: rows [0, 16) hold step 5, [16, 64) steps 2-4.
  assert int(model.support_set.pointer.numpy()) == 16
  assert not np.allclose(q, q0)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-4)
  assert np.all(model.support_set.labels.numpy() >= 0)
  assert int(model.optimizer.iterations.numpy()) == 5


def _loss_and_tape(model, views):
  with tf.GradientTape(persistent=True) as tape:
    _, z, p = model.embed(tf.concat(views, 0), training=True)
    b = views[0].shape[0]
    nn1, _ = model.support_set.nearest_neighbour(z[:b])
    from nnclr_tf.losses import nnclr_loss
    loss = nnclr_loss(nn1, p[b:], model.config.temperature)[0]
  return loss, tape, z


def test_gradient_path_nn_is_constant_and_p_carries_gradient():
  model = build(tf.distribute.get_strategy())
  rng = np.random.default_rng(0)
  views = [tf.constant(rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)) for _ in range(2)]
  loss, tape, z = _loss_and_tape(model, views)
  # No gradient into the queue, and none through the neighbour lookup back to z.
  assert tape.gradient(loss, model.support_set.embeddings) is None
  nn, _ = model.support_set.nearest_neighbour(z)
  with tf.GradientTape() as t2:
    t2.watch(z)
    nn, _ = model.support_set.nearest_neighbour(z)
    s = tf.reduce_sum(nn)
  assert t2.gradient(s, z) is None
  # Gradients reach the predictor and the encoder through p.
  g_pred = tape.gradient(loss, model.predictor.trainable_variables)
  g_enc = tape.gradient(loss, model.encoder.trainable_variables)
  assert all(g is not None for g in g_pred) and any(float(tf.norm(g)) > 0 for g in g_pred)
  assert any(g is not None and float(tf.norm(g)) > 0 for g in g_enc)


def test_zero_init_residual_follows_the_config_and_round_trips():
  from nnclr_tf import experiment
  from nnclr_tf.config import Experiment
  exp = Experiment.from_flags(dict(backbone="resnet18_cifar", width=8, proj_hidden_dim=32,
                                   proj_layers=2, pred_hidden_dim=32, embedding_dim=16,
                                   zero_init_residual=False, queue_size=64, batch_size=16,
                                   image_size=16))
  m = NNCLR(experiment.nnclr_config(exp))
  cfg = m.get_config()
  assert cfg["zero_init_residual"] is False
  again = NNCLR.from_config(cfg)
  assert again.config == m.config
  assert all(bool(np.all(layer.gamma.numpy() == 1)) for layer in again.encoder.layers
             if isinstance(layer, keras.layers.BatchNormalization))
  assert NNCLR(**TINY).get_config()["zero_init_residual"] is True


def test_invalid_arguments_are_refused():
  with pytest.raises(ValueError, match="temperature"):
    NNCLR(**{**TINY, "temperature": 0.0})
  with pytest.raises(ValueError, match="nn_topk"):
    NNCLR(**{**TINY, "nn_topk": 65})
  with pytest.raises(ConfigError, match="multiple"):
    check_batch(24, 64, 1)
  with pytest.raises(ConfigError, match="smaller"):
    check_batch(128, 64, 1)
  with pytest.raises(ConfigError, match="divisible"):
    check_batch(18, 36, 4)


def test_use_nn_false_and_topk_train(tmp_path):
  strategy = tf.distribute.get_strategy()
  r = train_steps(build(strategy, use_nn=False), strategy, tmp_path / "simclr", steps=2)
  assert np.isfinite(r["final_loss"]) and r["nn_label_hit"] is None
  r = train_steps(build(strategy, nn_topk=3), strategy, tmp_path / "topk", steps=2)
  assert np.isfinite(r["final_loss"])


def test_checkpoint_resume_restores_exactly(tmp_path):
  strategy = tf.distribute.get_strategy()
  model = build(strategy)
  train_steps(model, strategy, tmp_path, steps=3)
  saved = state(model)
  opt_vars = {v.path: v.numpy() for v in model.optimizer.variables}
  again = build(strategy, seed=99)
  with strategy.scope():
    again.compile(optimizer=training.build_optimizer(OptimConfig(), again.trainable_variables,
                                                     16, 10, 5))
    again.optimizer.build(again.trainable_variables)
  assert checkpoints.restore_latest(again, str(tmp_path))
  for k, v in state(again).items():
    np.testing.assert_array_equal(v, saved[k], err_msg=k)
  assert int(again.optimizer.iterations.numpy()) == 3
  restored_opt = {v.path: v.numpy() for v in again.optimizer.variables}
  for k, v in opt_vars.items():
    np.testing.assert_array_equal(restored_opt[k], v, err_msg=k)
