"""kNN while pretraining (--knn_every_steps) and any checkpoint evaluable (--checkpoint,
--keep_checkpoint_every_steps), end to end on the bundled digits with a tiny model.

The oracle of a monitor point is knn_eval of the checkpoint of the same step, restored in a
fresh model: the same weights and the same scoring must give the same accuracy.
"""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import checkpoints, experiment, knn_monitor
from nnclr_tf import model_dir as md
from nnclr_tf.config import Experiment
from nnclr_tf.errors import ConfigError, ModelDirError

pytestmark = pytest.mark.slow

TINY = dict(width=8, proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16, batch_size=32,
            queue_size=256, verbose=0, plots=False, knn_k=5, random_init_baseline=False,
            val_images=100, online_probe=False, knn_every_steps=4)


def knn_rows(model_dir):
  """[(step, knn_top1)] of every kNN row curves.csv holds, in the order written."""
  with open(md.path(model_dir, md.CURVES), newline="") as f:
    return [(int(r["step"]), float(r["knn_top1"])) for r in csv.DictReader(f) if r["knn_top1"]]


def drop_knn_row(path, step):
  """curves.csv as a kill after checkpoint `step`, before its kNN, leaves it."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=rows[0].keys())
    w.writeheader()
    w.writerows(r for r in rows if not (r["knn_top1"] and r["step"] == str(step)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """10 steps, kNN every 4 (points 4, 8 and the last, 10), milestones every 4, 2 kept."""
  d = str(tmp_path_factory.mktemp("knn") / "m")
  exp = Experiment.from_flagfile("quickstart", model_dir=d, train_steps=10,
                                 keep_checkpoint_every_steps=4, keep_checkpoints=2, **TINY)
  return exp, experiment.pretrain(exp)


def test_points_at_every_n_steps_and_the_last_go_to_curves_tensorboard_and_results(run):
  exp, r = run
  d = exp.train.model_dir
  assert [p["step"] for p in r["knn_curve"]] == [4, 8, 10]
  assert knn_rows(d) == [(p["step"], p["knn_top1"]) for p in r["knn_curve"]]
  assert r["knn_monitor_seconds"] > 0
  assert os.listdir(os.path.join(d, md.LOGS, "knn"))  # the TensorBoard events
  # The final point is the final kNN's (same checkpoint, bank and scoring here: bank 0 = all).
  assert r["knn_curve"][-1]["knn_top1"] == pytest.approx(r["knn_top1"], abs=1e-9)


def test_a_point_equals_knn_eval_of_the_checkpoint_of_its_step(run):
  exp, r = run
  # ckpt-4 is a milestone only (--keep_checkpoints=2 kept 8 and 10); ckpt-8 is both.
  at_4 = experiment.knn_eval(exp.replace(checkpoint="4"))
  assert at_4["checkpoint"].endswith(os.path.join(checkpoints.MILESTONES, "ckpt-4"))
  assert at_4["knn_top1"] == pytest.approx(r["knn_curve"][0]["knn_top1"], abs=1e-9)
  at_8 = experiment.knn_eval(exp.replace(checkpoint="8"))
  assert at_8["checkpoint"] == os.path.join(exp.train.model_dir, "ckpt-8")
  assert at_8["knn_top1"] == pytest.approx(r["knn_curve"][1]["knn_top1"], abs=1e-9)


def test_milestones_outlive_the_kept_checkpoints_and_a_missing_step_lists_those_there_are(run):
  exp, _ = run
  d = exp.train.model_dir
  assert sorted(checkpoints.available_checkpoints(d)) == [4, 8, 10]
  kept = [checkpoints.checkpoint_step(p) for p in
          tf.train.get_checkpoint_state(d).all_model_checkpoint_paths]
  assert kept == [8, 10]  # --keep_checkpoints=2: ckpt-4 lives on as a milestone only
  with pytest.raises(ModelDirError, match=r"no checkpoint of step 6; it has steps 4, 8, 10"):
    experiment.knn_eval(exp.replace(checkpoint="6"))
  with pytest.raises(ModelDirError, match="neither a step"):
    experiment.knn_eval(exp.replace(checkpoint=os.path.join(d, "ckpt-99")))
  with pytest.raises(ConfigError, match="--mode=pretrain always resumes from the newest"):
    experiment.pretrain(exp.replace(checkpoint="4"))


def test_export_and_plots_of_an_older_checkpoint_record_it(run):
  exp, _ = run
  older = exp.replace(checkpoint="4")
  out = experiment.export(older)
  from nnclr_tf import export as export_lib
  meta = export_lib.read_metadata(out["encoder_export_dir"])
  assert meta["checkpoint_step"] == 4 and out["checkpoint"] == meta["checkpoint"]
  assert meta["checkpoint"].endswith(os.path.join(checkpoints.MILESTONES, "ckpt-4"))
  assert experiment.plots(older)["checkpoint"] == out["checkpoint"]


def test_resuming_neither_repeats_nor_skips_a_point(tmp_path):
  """A kill between checkpoint 8 and its kNN (its row and the results gone): the rerun scores 8
  from the restored state, which is step 8's, then goes on; no step gets two rows."""
  d = str(tmp_path / "m")
  exp = Experiment.from_flagfile("quickstart", model_dir=d, train_steps=8,
                                 deterministic=True, **TINY)
  first = experiment.pretrain(exp)
  assert [p["step"] for p in first["knn_curve"]] == [4, 8]
  path = md.path(d, md.CURVES)
  drop_knn_row(path, 8)
  os.remove(md.results_path(d, "pretrain"))
  again = experiment.pretrain(exp)  # no step left to train: the point comes from finish()
  assert [p["step"] for p in again["knn_curve"]] == [4, 8]
  assert again["knn_curve"][1]["knn_top1"] == pytest.approx(first["knn_curve"][1]["knn_top1"],
                                                            abs=1e-9)
  # Again killed before the kNN of 8, then run longer: the resume at step 8 scores it first.
  drop_knn_row(path, 8)
  longer = experiment.pretrain(exp.replace(train_steps=14))
  assert longer["knn_curve"][1]["knn_top1"] == pytest.approx(first["knn_curve"][1]["knn_top1"],
                                                             abs=1e-9)
  assert [p["step"] for p in longer["knn_curve"]] == [4, 8, 12, 14]
  steps = [s for s, _ in knn_rows(d)]
  assert sorted(steps) == [4, 8, 12, 14], steps  # each once


def test_recorded_steps_reads_only_rows_with_a_point(tmp_path):
  path = str(tmp_path / "curves.csv")
  knn_monitor.monitors.append_row(path, {"step": 3, "loss": 1.0})
  knn_monitor.monitors.append_row(path, {"step": 6, "knn_top1": 0.5})
  assert knn_monitor.recorded_steps(path) == {6}
  assert knn_monitor.recorded_steps(str(tmp_path / "absent.csv")) == set()
  assert knn_monitor.curve(path) == [{"step": 6, "knn_top1": 0.5}]


def test_the_monitor_leaves_training_as_it_is(tmp_path):
  """Inference mode and no draw from the training's random streams: a seeded --deterministic run
  ends with the same weights, support set and step with the monitor as without it."""
  ends = []
  for every in (0, 3):
    d = str(tmp_path / f"every{every}")
    exp = Experiment.from_flagfile("quickstart", model_dir=d, train_steps=6, deterministic=True,
                                   **{**TINY, "knn_every_steps": every})
    experiment.pretrain(exp)
    reader = tf.train.load_checkpoint(os.path.join(d, "ckpt-6"))
    ends.append({k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                 if "save_counter" not in k})
  assert ends[0].keys() == ends[1].keys()
  for k in ends[0]:
    np.testing.assert_array_equal(ends[0][k], ends[1][k], err_msg=k)
