"""From an Experiment to a model: one strategy per set-up, the random-init encoder."""

import keras
import numpy as np

from nnclr_tf import building
from nnclr_tf.backbones import build_backbone
from nnclr_tf.config import Experiment

EXP = Experiment.from_flags(dict(backbone="small_cnn", width=8, image_size=16, batch_size=16,
                                 queue_size=64, proj_hidden_dim=32, pred_hidden_dim=32,
                                 embedding_dim=16, seed=5))


def test_setup_makes_one_strategy_per_runtime():
  assert building.setup(EXP) is building.setup(EXP.replace(seed=6))


def test_the_random_init_encoder_is_the_seeded_backbone_with_local_bn():
  """seed + 1, as the random-init baselines have always drawn it."""
  keras.utils.set_random_seed(6)
  want = build_backbone("small_cnn", (16, 16, 3), False, 8)
  got = building.build_encoder(EXP)
  for a, b in zip(got.weights, want.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not any(getattr(layer, "synchronized", False) for layer in got.layers)


def test_build_model_follows_the_experiment():
  model = building.build_model(EXP)
  assert model.config == building.nnclr_config(EXP)
  assert model.support_set.size == 64 and model.encoder.output.shape[-1] == 32
