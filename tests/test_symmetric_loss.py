"""The symmetric NNCLR loss (paper Sec. 3.2): row and column softmax terms, across replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored
from nnclr_tf import data, distributed, training
from nnclr_tf.config import AugmentConfig, DataConfig, OptimConfig, TrainConfig
from nnclr_tf.losses import nnclr_loss
from nnclr_tf.model import NNCLR
from oracles import nnclr_loss as numpy_loss
from oracles import unit as _unit

AUG = AugmentConfig(flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0),
                    solarize_prob=(0, 0), crop_scale=(0.4, 1.0))
TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64, temperature=0.1)


def test_one_replica_matches_numpy():
  rng = np.random.default_rng(0)
  nn, p = _unit(rng, 8, 5), _unit(rng, 8, 5)
  loss, logits, _ = nnclr_loss(nn, p, 0.2, symmetric=True, nn_global=nn, p_local=p)
  assert float(loss) == pytest.approx(numpy_loss(nn, p, 0.2, symmetric=True), rel=1e-5)
  np.testing.assert_allclose(logits.numpy(), nn @ p.T / 0.2, rtol=1e-5, atol=1e-5)
  # The column term matters: without it the value differs.
  assert float(nnclr_loss(nn, p, 0.2)[0]) != pytest.approx(float(loss), rel=1e-3)
  with pytest.raises(ValueError, match="nn_global"):
    nnclr_loss(nn, p, 0.2, symmetric=True)


def test_two_replicas_match_numpy_on_the_global_batch():
  """Each replica holds 4 of the 8 rows and all-gathers p and the neighbours; the mean of the
  replicas' losses is the oracle's loss of the whole batch."""
  rng = np.random.default_rng(1)
  nn, p = _unit(rng, 8, 6), _unit(rng, 8, 6)
  strategy = mirrored(2)

  def step():
    b = 4
    off = distributed.replica_id() * b
    nn_l = distributed.local_rows(tf.constant(nn), b)
    p_l = distributed.local_rows(tf.constant(p), b)
    loss, _, _ = nnclr_loss(nn_l, distributed.all_gather(p_l), 0.3, off, symmetric=True,
                            nn_global=distributed.all_gather(nn_l), p_local=p_l)
    return loss

  per_replica = strategy.run(tf.function(step))
  losses = [float(x) for x in strategy.experimental_local_results(per_replica)]
  assert len(losses) == 2
  assert np.mean(losses) == pytest.approx(numpy_loss(nn, p, 0.3, symmetric=True), rel=1e-5)


def build(strategy, seed=7, **kw):
  keras.utils.set_random_seed(seed)
  with strategy.scope():
    return NNCLR(seed=seed, **{**TINY, **kw})


def train_steps(model, strategy, model_dir, steps):
  train, _ = data.load_sources(DataConfig(dataset="digits"))
  return training.pretrain(
      model, strategy, train, DataConfig(image_size=16), AUG,
      TrainConfig(model_dir=str(model_dir), batch_size=16, train_steps=steps, seed=7, verbose=0),
      OptimConfig(optimizer="lars", learning_rate=0.5, weight_decay=1e-4, warmup_epochs=0))


def state(model):
  return {v.path: np.array(v.numpy()) for v in model.weights}


@pytest.mark.slow
def test_symmetric_training_step_matches_across_replica_counts(tmp_path):
  """Same global batch and seed: 1 vs 2 replicas give the same symmetric loss and the same
  weights after one step (the column term's neighbours must be the global batch's)."""
  s1, s2 = mirrored(1), mirrored(2)
  one = build(s1, symmetric_loss=True)
  r1 = train_steps(one, s1, tmp_path / "one", steps=1)
  two = build(s2, symmetric_loss=True)
  r2 = train_steps(two, s2, tmp_path / "two", steps=1)
  assert r2["final_loss"] == pytest.approx(r1["final_loss"], rel=1e-5)
  a, b = state(one), state(two)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-5, err_msg=k)
  # The symmetric loss is not the row-only loss on the same batch.
  plain = build(s1)
  r0 = train_steps(plain, s1, tmp_path / "plain", steps=1)
  assert r0["final_loss"] != pytest.approx(r1["final_loss"], rel=1e-4)


def test_symmetric_flag_round_trips_and_follows_the_config():
  cfg = NNCLR(**TINY, symmetric_loss=True).get_config()
  assert cfg["symmetric_loss"] is True
  assert NNCLR.from_config(cfg).config.symmetric_loss is True
  from nnclr_tf import experiment
  from nnclr_tf.config import Experiment
  exp = Experiment.from_flags(dict(backbone="small_cnn", width=8, proj_hidden_dim=32,
                                   proj_layers=2, pred_hidden_dim=32, embedding_dim=16,
                                   queue_size=64, batch_size=16, image_size=16,
                                   symmetric_loss=True))
  assert NNCLR(experiment.nnclr_config(exp)).config.symmetric_loss is True
