"""End-to-end tests of run.py in subprocesses (each gets its own logical-CPU split)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tolerances
from conftest import REPO

pytestmark = pytest.mark.slow  # run.py processes end to end

TINY = ["--proj_hidden_dim=64", "--pred_hidden_dim=64", "--width=16", "--verbose=0"]


def run(args, timeout=300):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def results(model_dir, name="pretrain_results.json"):
  with open(os.path.join(model_dir, name)) as f:
    return json.load(f)


def test_quickstart_learns(tmp_path):
  """The quickstart preset end to end. Broken NN positives, enqueue or gradients fail it: the
  loss must fall far below its start (log 128 = 4.85), the neighbours must share labels far above
  chance (0.1), and kNN must beat chance by a wide margin."""
  d = str(tmp_path / "qs")
  p = run(["--flagfile=flags/quickstart.cfg", f"--model_dir={d}", "--train_epochs=8"])
  assert p.returncode == 0, p.stderr[-3000:]
  r = results(d)
  assert r["steps"] == 88 and r["epochs"] == pytest.approx(8.0)
  assert r["final_loss"] < 3.5
  assert r["nn_label_hit"] > 0.5
  assert r["knn_top1"] > 0.8
  assert os.path.exists(os.path.join(d, "export", "encoder", "1", "saved_model.pb"))
  assert os.path.exists(os.path.join(d, "flags.txt")) and os.listdir(os.path.join(d, "logs"))
  # knn_eval on the same model_dir reproduces the kNN of the trained encoder.
  p = run(["--flagfile=flags/quickstart.cfg", f"--model_dir={d}", "--mode=knn_eval"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert results(d, "knn_results.json")["knn_top1"] == pytest.approx(r["knn_top1"], abs=1e-6)
  # Running pretrain again resumes at the end: no further steps, a new export version.
  p = run(["--flagfile=flags/quickstart.cfg", f"--model_dir={d}", "--train_epochs=9"])
  assert p.returncode == 0, p.stderr[-3000:]
  r2 = results(d)
  assert r2["resumed_from_step"] == 88 and r2["steps"] == 99
  assert sorted(os.listdir(os.path.join(d, "export", "encoder"))) == ["1", "2"]


def test_one_two_four_replicas_agree(tmp_path, record_property):
  """3 steps of the same global batch on 1, 2 and 4 replicas end in the same state up to
  cross-kernel rounding (tolerances.py), measured against what training changed from the
  initial state (rebuilt from the run's model_config.json and seed)."""
  # A small lr keeps float reduction-order differences (1e-7) from being amplified by LARS.
  common = ["--flagfile=flags/quickstart.cfg", "--train_steps=3", "--seed=7",
            "--learning_rate=0.05", *TINY]
  out = {}
  for n in (1, 2, 4):
    d = str(tmp_path / f"r{n}")
    p = run([*common, f"--model_dir={d}", f"--cpu_replicas={n}"])
    assert p.returncode == 0, p.stderr[-3000:]
    out[n] = (results(d), tolerances.checkpoint(d))
  base_r, base_ckpt = out[1]
  init = tolerances.initial_checkpoint(str(tmp_path / "r1"), str(tmp_path))
  queue = "model/support_set/embeddings/.ATTRIBUTES/VARIABLE_VALUE"
  # The rebuilt start is the run's: the queue rows 3 steps of 128 did not reach are its own.
  assert np.all(init[queue] == base_ckpt[queue], axis=1).sum() == 1024 - 3 * 128
  for n in (2, 4):
    r, ckpt = out[n]
    assert r["replicas"] == n
    record_property(f"loss_gap_{n}", tolerances.loss_gap(base_r["final_loss"], r["final_loss"]))
    tolerances.assert_loss_close(base_r["final_loss"], r["final_loss"])
    assert ckpt.keys() == base_ckpt.keys() and len(ckpt) > 10
    keys = " ".join(ckpt)
    assert "_trainable_variables" in keys and "moving_variance" in keys  # weights, global BN
    assert int(ckpt["model/support_set/pointer/.ATTRIBUTES/VARIABLE_VALUE"]) == 3 * 128
    record_property(f"divergence_{n}", tolerances.divergence(init, base_ckpt, ckpt))
    tolerances.assert_trained_close(init, base_ckpt, ckpt)


@pytest.mark.parametrize("args,needle", [
    (["--temperature=0"], "--temperature"),
    (["--queue_size=1000"], "--queue_size=1000 must be a multiple"),
    (["--queue_size=64"], "smaller than --batch_size"),
    (["--batch_size=127", "--cpu_replicas=2", "--queue_size=1016"], "divisible"),
    (["--dataset=folder"], "--image_dir"),
    (["--blur_prob=2"], "--blur_prob"),
])
def test_bad_flags_give_one_clear_line(tmp_path, args, needle):
  p = run(["--flagfile=flags/quickstart.cfg", f"--model_dir={tmp_path}", *args], timeout=120)
  assert p.returncode == 2
  assert needle in p.stderr and "Traceback" not in p.stderr
