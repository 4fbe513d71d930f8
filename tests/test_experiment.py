"""The experiment API as a notebook uses it: pretrain -> kNN -> linear_eval -> export in one
process, no flags, each returning its results and writing them into the model_dir."""

import os

import pytest

from nnclr_tf import checkpoints, experiment
from nnclr_tf import model_dir as md
from nnclr_tf.config import Experiment

pytestmark = pytest.mark.slow

TINY = dict(width=8, proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16, batch_size=32,
            queue_size=256, verbose=0, train_steps=3, plots=False, knn_k=5,
            linear_l2="1e-3", linear_random_init=False, val_images=100)


def test_pretrain_knn_linear_export_without_flags(tmp_path):
  exp = Experiment.from_flagfile("quickstart", model_dir=str(tmp_path / "m"), **TINY)
  r = experiment.pretrain(exp)
  assert r["steps"] == 3 and r["final_loss"] > 0 and 0 <= r["knn_top1"] <= 1
  assert r == md.read_results(exp.train.model_dir, "pretrain")
  assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(exp.train.model_dir)) == 3
  k = experiment.knn_eval(exp)
  assert k["knn_top1"] == pytest.approx(r["knn_top1"], abs=1e-6)  # the restore is complete
  lin = experiment.linear_eval(exp)
  assert 0 <= lin["linear_top1"] <= 1 and os.path.exists(lin["probe"])
  out = experiment.export(exp)
  assert out["encoder_export_dir"].endswith(os.path.join("encoder", "2"))
  assert out["classifier_export_dir"].endswith(os.path.join("classifier", "2"))
  # The same pretraining again has nothing to do and says so.
  assert experiment.pretrain(exp) == md.read_results(exp.train.model_dir, "pretrain")
