"""--mode=continuous_eval beside a running pretrain (two processes), and readers that take no lock:
each new checkpoint is scored once, in step order, with the figures knn_eval gives for the same
checkpoint; the evaluator stops at the run's last step, or after --eval_timeout without a new one.
"""

import json
import os
import signal
import time

import pytest
from test_reliability import finish, spawn  # noqa: F401  (a fixture)

from conftest import REPO
from nnclr_tf import checkpoints, continuous_eval, experiment
from nnclr_tf import model_dir as md
from nnclr_tf.config import Experiment

QUICKSTART = os.path.join(REPO, "flags", "quickstart.cfg")
# 1500 training digits / 32: 46 steps per epoch; 60 steps, a checkpoint (and a milestone) every 10.
FLAGS = [f"--flagfile={QUICKSTART}", "--val_images=297", "--width=8", "--proj_hidden_dim=32",
         "--pred_hidden_dim=32", "--embedding_dim=16", "--batch_size=32", "--queue_size=256",
         "--train_steps=60", "--checkpoint_every_steps=10", "--keep_checkpoint_every_steps=10",
         "--seed=3", "--noplots", "--knn_k=5", "--random_init_baseline=false", "--verbose=1"]


def last_json(out):
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_evaluator_follows_the_trainer_and_readers_get_in(tmp_path, spawn):  # noqa: F811
  d = str(tmp_path / "m")
  trainer = spawn(["--mode=pretrain", *FLAGS, f"--model_dir={d}"])
  evaluator = spawn(["--mode=continuous_eval", *FLAGS, f"--model_dir={d}",
                     "--eval_poll_seconds=1", "--eval_timeout=300"])
  # A reader while the trainer holds run.lock (paused mid-run, so that the two surely overlap):
  # it is let in and scores the newest checkpoint.
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.exists(os.path.join(d, "ckpt-10.index")):
    time.sleep(0.05)
  os.kill(trainer.pid, signal.SIGSTOP)
  try:
    assert trainer.poll() is None, "the trainer finished before a reader could run beside it"
    assert os.path.exists(os.path.join(d, md.LOCK))
    code, out, err = finish(spawn(["--mode=knn_eval", *FLAGS, f"--model_dir={d}"]))
  finally:
    os.kill(trainer.pid, signal.SIGCONT)
  assert code == 0, err[-3000:]
  assert "in use by" not in err
  assert checkpoints.checkpoint_step(last_json(out)["checkpoint"]) >= 10  # one of the trainer's
  code, _, err = finish(trainer)
  assert code == 0, err[-3000:]
  code, out, err = finish(evaluator, timeout=300)
  assert code == 0, err[-3000:]
  results = last_json(out)
  lines = continuous_eval.records(d)
  steps = [r["step"] for r in lines]
  assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # once each, in order, the last
  assert results["last_step"] == 60 and results["scored_steps"] == steps
  assert not results["timed_out"] and "Traceback" not in err
  # A line's figures are knn_eval's of the same checkpoint (a milestone kept it).
  for r in (lines[0], lines[-1]):
    exp = Experiment.from_flagfile(QUICKSTART, **_overrides(d), checkpoint=str(r["step"]))
    knn = experiment.knn_eval(exp)
    assert knn["knn_top1"] == pytest.approx(r["knn_top1"], abs=1.5 / 297), r
  assert os.path.isdir(os.path.join(d, md.LOGS, "continuous_eval"))


def _overrides(d):
  return dict(model_dir=d, val_images=297, width=8, proj_hidden_dim=32, pred_hidden_dim=32,
              embedding_dim=16, batch_size=32, queue_size=256, train_steps=60, seed=3,
              plots=False, knn_k=5, random_init_baseline=False, verbose=0)


@pytest.mark.slow
def test_the_evaluator_times_out_without_a_new_checkpoint_and_resumes_after_its_last_line(
    tmp_path):
  tiny = {**_overrides(str(tmp_path / "m")), "train_steps": 3, "checkpoint_every_steps": 0,
          "keep_checkpoint_every_steps": 0}
  exp = Experiment.from_flagfile(QUICKSTART, **tiny)
  experiment.pretrain(exp)
  d = exp.train.model_dir
  # As while pretraining to step 6 runs: no results yet, a checkpoint of step 3.
  os.remove(md.results_path(d, "pretrain"))
  follow = Experiment.from_flagfile(QUICKSTART, **{**tiny, "train_steps": 6},
                                    eval_timeout=1, eval_poll_seconds=1)
  t0 = time.monotonic()
  r = experiment.continuous_eval(follow)
  assert r["scored_steps"] == [3] and r["timed_out"] and r["last_step"] == 3
  assert time.monotonic() - t0 < 120
  knn = experiment.knn_eval(exp)
  assert r["knn_top1"] == pytest.approx(knn["knn_top1"], abs=1e-6)  # the same checkpoint, process
  with open(os.path.join(d, continuous_eval.FILE), "a") as f:
    f.write('{"step": 9, "knn_')  # a line torn by a kill: not a record
  again = experiment.continuous_eval(follow)
  assert again["scored_steps"] == [] and again["timed_out"]
  assert [x["step"] for x in continuous_eval.records(d)] == [3]
