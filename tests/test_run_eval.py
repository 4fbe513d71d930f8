"""End to end on digits through run.py subprocesses: pretrain (with the online probe, curves and
plots), then knn_eval, linear_eval, finetune and plots on the same model_dir."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_run import TINY, run

from nnclr_tf import plots
from nnclr_tf.linear_probe import load_probe

pytestmark = pytest.mark.slow  # run.py processes end to end

COMMON = ["--flagfile=flags/quickstart.cfg", *TINY, "--plot_tsne_points=300"]


def load(model_dir, name):
  with open(os.path.join(model_dir, name)) as f:
    return json.load(f)


def png_shape(path):
  assert os.path.getsize(path) > 1000
  return tuple(tf.io.decode_png(tf.io.read_file(path), channels=3).shape)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("eval") / "model")
  p = run([*COMMON, f"--model_dir={d}", "--train_epochs=2"])
  assert p.returncode == 0, p.stderr[-3000:]
  return d


def test_pretrain_writes_monitors_and_plots(pretrained):
  r = load(pretrained, "pretrain_results.json")
  assert r["steps"] == 22 and 0.0 <= r["online_probe_acc"] <= 1.0
  # The probe is a monitor, not architecture: eval/export modes build without it and must match.
  assert not [k for k in load(pretrained, "model_config.json") if k.startswith("online_probe")]
  with open(os.path.join(pretrained, "curves.csv")) as f:
    rows = list(csv.DictReader(f))
  steps = [int(row["step"]) for row in rows]
  assert steps[0] == 1 and steps[-1] == 22 and steps == sorted(steps)
  assert all(row["online_probe_acc"] and row["nn_label_hit"] for row in rows)
  lrs = [float(row["learning_rate"]) for row in rows]
  assert lrs[0] > 0 and lrs[1] > lrs[0]  # the warm-up ramp of the pretraining schedule
  assert set(r["plots"]) == {"retrieval_grid", "embedding_map", "training_curves"}
  assert png_shape(r["plots"]["retrieval_grid"]) == (*plots.retrieval_grid_size(8, 8), 3)
  assert png_shape(r["plots"]["embedding_map"]) == (800, 800, 3)
  assert png_shape(r["plots"]["training_curves"]) == (700, 1000, 3)
  tb = os.path.join(pretrained, "logs", "plots")
  tags = {v.tag for f in os.listdir(tb)
          for e in tf.compat.v1.train.summary_iterator(os.path.join(tb, f))
          for v in e.summary.value}
  assert tags == {"retrieval_grid", "embedding_map", "training_curves"}
  # kNN and the plots shared one feature cache for the final checkpoint (+ the random init).
  cached = sorted(f.split("-")[0] + "-" + f.split("-")[1] if f.startswith("ckpt") else
                  f.split("-")[0] for f in os.listdir(os.path.join(pretrained, "features")))
  assert cached == ["ckpt-22", "random_init"], cached


def test_knn_eval_reproduces_pretrain(pretrained):
  p = run([*COMMON, f"--model_dir={pretrained}", "--mode=knn_eval"])
  assert p.returncode == 0, p.stderr[-3000:]
  r = load(pretrained, "knn_results.json")
  assert r["knn_top1"] == pytest.approx(load(pretrained, "pretrain_results.json")["knn_top1"])
  assert r["knn_top5"] >= r["knn_top1"]


def test_linear_eval_and_probe_file(pretrained):
  p = run([*COMMON, f"--model_dir={pretrained}", "--mode=linear_eval", "--linear_l2=1e-4,1e-2"])
  assert p.returncode == 0, p.stderr[-3000:]
  r = load(pretrained, "linear_eval_results.json")
  assert r["converged"] and r["linear_top1"] > 0.8 and r["linear_top5"] >= r["linear_top1"]
  assert 0.1 < r["linear_top1_random_init"] <= 1.0
  probe = load_probe(os.path.join(pretrained, "linear_probe", "probe.npz"))
  assert probe.kernel.shape == (64, 10) and probe.image_size == 16  # small_cnn width 16: 4 x 16
  assert list(probe.class_names) == [str(i) for i in range(10)]
  # linear_eval ends by exporting the servable classifier (encoder + this probe).
  assert r["classifier_export_dir"].endswith(os.path.join("export", "classifier", "1"))
  assert os.path.exists(os.path.join(r["classifier_export_dir"], "saved_model.pb"))
  # The saved probe applied to the cached raw features reproduces the reported accuracy.
  with np.load(r["feature_cache"]) as z:
    pred = probe.logits(z["eval_features"]).argmax(1)
    assert np.mean(pred == z["eval_labels"]) == pytest.approx(r["linear_top1"])
    assert len(z["eval_labels"]) == 297


def test_finetune_ten_percent(pretrained):
  p = run([*COMMON, f"--model_dir={pretrained}", "--mode=finetune", "--label_fraction=0.1",
           "--finetune_epochs=60", "--finetune_lr=0.5"])
  assert p.returncode == 0, p.stderr[-3000:]
  r = load(pretrained, "finetune_results.json")
  assert r["labelled_examples"] == 150 and r["labelled_per_class"] == [15, 15]
  assert r["steps"] == 60 and r["eval_examples"] == 297
  assert r["finetune_top1"] > 0.5 and r["finetune_top5"] >= r["finetune_top1"]
  assert r["by_label_fraction"]["0.1"]["finetune_top1"] == r["finetune_top1"]


def test_plots_mode_redraws(pretrained):
  for f in os.listdir(os.path.join(pretrained, "plots")):
    os.remove(os.path.join(pretrained, "plots", f))
  p = run([*COMMON, f"--model_dir={pretrained}", "--mode=plots"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(pretrained, "plots"))) == [
      "embedding_map.png", "retrieval_grid.png", "training_curves.png"]
  assert png_shape(os.path.join(pretrained, "plots", "retrieval_grid.png")) == \
         (*plots.retrieval_grid_size(8, 8), 3)


def test_online_probe_size_follows_labels_and_resumed_checkpoints(pretrained, tmp_path):
  """New runs size the probe from the labels; a resumed run keeps its checkpoint's probe (or its
  absence), so toggling --online_probe never breaks a restore."""
  from nnclr_tf import data, pretraining
  from nnclr_tf.config import Experiment
  from nnclr_tf.model import NNCLR
  digits = data.digits_source()
  unlabelled = data.numpy_source(digits.images[:50])
  strategy = tf.distribute.get_strategy()
  plain_dir = str(tmp_path / "plain")
  tf.train.Checkpoint(model=NNCLR(backbone="small_cnn", image_size=16, width=8, queue_size=64,
                                  proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16)
                      ).save(os.path.join(plain_dir, "ckpt"))
  def classes(source, model_dir, **flags):
    exp = Experiment.from_flags({"model_dir": model_dir, **flags})
    return pretraining.online_probe_classes(exp, source, strategy)

  assert classes(digits, str(tmp_path / "new")) == 10
  assert classes(unlabelled, str(tmp_path / "new")) == 0
  assert classes(digits, pretrained) == 10
  assert classes(digits, plain_dir) == 0
  assert classes(digits, str(tmp_path / "new"), online_probe=False) == 0
