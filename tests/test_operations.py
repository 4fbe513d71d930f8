"""Operating a run: SIGTERM/SIGINT save and exit 143/130 and the same command resumes bit for bit,
one run per model_dir (run.lock), a full disk stops with one line and keeps the last checkpoint,
per-step training curves, export metadata, and a quiet CLI that ends with a summary.

One group of run.py processes serves several checks (the processes are the expensive part)."""

import json
import os
import resource
import signal
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
from test_reliability import (
  build,
  checkpoint_steps,
  checkpoint_tensors,
  data,
  finish,
  spawn,  # noqa: F401  (a fixture)
)

from conftest import REPO
from nnclr_tf import checkpoints, cluster, errors, experiment, monitors
from nnclr_tf import model_dir as md
from nnclr_tf.config import Experiment

QUICKSTART = os.path.join(REPO, "flags", "quickstart.cfg")
# 1797 digits / 32 = 56 steps per epoch, 112 in all; a curves.csv row every step.
FLAGS = [f"--flagfile={QUICKSTART}", "--val_images=297", "--width=8", "--proj_hidden_dim=32",
         "--pred_hidden_dim=32", "--embedding_dim=16", "--batch_size=32", "--queue_size=256",
         "--train_epochs=2", "--seed=3", "--deterministic", "--noplots", "--knn_k=5",
         "--verbose=2"]
SPE = 1500 // 32


def curve_step(model_dir):
  """The newest step in curves.csv (0 before the first row)."""
  try:
    with open(os.path.join(model_dir, md.CURVES)) as f:
      rows = f.read().split()
  except OSError:
    return 0
  return int(rows[-1].split(",")[0]) if len(rows) > 1 and rows[-1][0].isdigit() else 0


def wait_for(condition, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return True
    time.sleep(0.01)
  return False


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_same_command_resumes_bit_identical(
    tmp_path, spawn):  # noqa: F811
  """A real SIGTERM mid-epoch: the run finishes the step, saves it, exits 143 with one `stopped:`
  line and releases the lock; a second run on the same model_dir while the first holds it exits 2
  naming the holder; a lock left by a dead pid is taken over with a warning; the resumed run ends
  with the checkpoint tensors of an uninterrupted run (run concurrently); the encoder export's
  metadata carries the model config, preprocessing and pretraining figures; stdout ends with the
  summary then the JSON; stderr has no TensorFlow start-up lines."""
  straight_dir, victim_dir = str(tmp_path / "straight"), str(tmp_path / "victim")
  straight = spawn([*FLAGS, f"--model_dir={straight_dir}"])
  victim = spawn([*FLAGS, f"--model_dir={victim_dir}"])
  lock = os.path.join(victim_dir, md.LOCK)
  assert wait_for(lambda: os.path.exists(lock), victim)
  code, _, err = finish(spawn([*FLAGS, f"--model_dir={victim_dir}"]), timeout=120)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1, err[-2000:]
  assert lines[0].startswith("error: ") and f"in use by pid {victim.pid} on " in lines[0]

  assert wait_for(lambda: curve_step(victim_dir) >= 5, victim), "training never started"
  os.kill(victim.pid, signal.SIGTERM)
  code, out, err = finish(victim)
  assert code == 143, err[-3000:]
  stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
  assert len(stopped) == 1 and "SIGTERM at step " in stopped[0], err[-2000:]
  step = int(stopped[0].split("SIGTERM at step ")[1].split(":")[0])
  assert checkpoint_steps(victim_dir) == [step] and 5 <= step < SPE  # mid-epoch, nothing earlier
  assert f"ckpt-{step} saved" in stopped[0]
  assert not os.path.exists(lock) and "Traceback" not in err
  assert not os.path.exists(os.path.join(victim_dir, "pretrain_results.json"))

  # A lock of a process that is gone (a kill -9): the next run takes it over.
  with open(lock, "w") as f:
    json.dump({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "mode": "pretrain",
               "started": "earlier"}, f)
  code, out, err = finish(spawn([*FLAGS, f"--model_dir={victim_dir}"]))
  assert code == 0, err[-3000:]
  assert "taking over the stale lock of pid 4206649" in err and not os.path.exists(lock)
  code, out_straight, err_straight = finish(straight)
  assert code == 0, err_straight[-3000:]

  resumed, reference = (md.read_results(d, "pretrain") for d in (victim_dir, straight_dir))
  assert resumed["resumed_from_step"] == step and resumed["steps"] == reference["steps"] == 2 * SPE
  a = checkpoint_tensors(os.path.join(straight_dir, f"ckpt-{2 * SPE}"))
  b = checkpoint_tensors(os.path.join(victim_dir, f"ckpt-{2 * SPE}"))
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    if "save_counter" not in k:
      np.testing.assert_array_equal(b[k], a[k], err_msg=k)

  meta = json.load(open(os.path.join(resumed["export_dir"], "assets.extra", "nnclr_tf.json")))
  assert meta["checkpoint_step"] == 2 * SPE and meta["image_size"] == 16
  assert meta["checkpoint"] == os.path.abspath(os.path.join(victim_dir, f"ckpt-{2 * SPE}"))
  assert meta["model_config"] == json.load(open(os.path.join(victim_dir, md.MODEL_CONFIG)))
  assert meta["model_config"]["width"] == 8
  assert meta["preprocessing"]["crop_fraction"] == 1.0
  for key in ("knn_top1", "knn_top1_random_init", "final_loss", "steps"):
    assert meta["pretraining"][key] == resumed[key], key

  for text in (out, out_straight):
    last = text.rstrip().splitlines()
    assert json.loads(last[-1])["steps"] == 2 * SPE
    assert any(line.startswith("pretrained ") for line in last[-8:-1])
    assert any(line.strip().startswith("kNN top-1 ") for line in last[-8:-1])
  for text in (err, err_straight):
    assert not [line for line in text.splitlines()
                if "absl::InitializeLog" in line or "cuInit" in line or line[:5] in (
                    "I0000", "E0000", "W0000")], text[-2000:]
  print(json.dumps({"sigterm_after_curve_step": ">=5", "stopped_at_step": step,
                    "resumed_steps": 2 * SPE - step, "tensors_compared": len(a)}))


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path,
                                                                       spawn):  # noqa: F811
  """RLIMIT_FSIZE lowered (prlimit) under a running run.py once its first checkpoint exists, with
  SIGXFSZ ignored so that writes fail with EFBIG as on a full disk: exit 2, one `error:` line
  naming the model_dir and the kept checkpoint, which restores and is the newest."""
  d = str(tmp_path / "full")
  proc = spawn([*FLAGS, f"--model_dir={d}", "--checkpoint_every_steps=5"], ignore_sigxfsz=True)
  data_file = os.path.join(d, "ckpt-5.data-00000-of-00001")
  assert wait_for(lambda: tf.train.latest_checkpoint(d) is not None, proc)
  limit = os.path.getsize(data_file) // 2
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
  code, _, err = finish(proc)
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(lines) == 1, err[-3000:]
  assert "Traceback" not in err and f"--model_dir={d}" in lines[0]
  latest = tf.train.latest_checkpoint(d)
  assert f"the last good checkpoint {os.path.basename(latest)} is kept" in lines[0]
  assert os.path.getsize(latest + ".data-00000-of-00001") > limit  # written before the limit
  reader = tf.train.load_checkpoint(latest)
  assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == \
      checkpoints.checkpoint_step(latest) == 5
  assert "File too large" in lines[0] and f"writing {d}/ckpt-10_temp/" in lines[0]
  assert "ran out of data" not in err  # model.fit did not take the failed save for the data end
  assert not os.path.exists(os.path.join(d, md.LOCK))


# ------------------------------------------------------------------------------------------------
# In process

def test_sigint_in_training_saves_that_step_and_raises_preempted_130(tmp_path):
  """SIGINT delivered to this process at the end of step 3 (after the stop check of that step):
  step 4, the one then under way, is finished and saved, and Preempted (exit code 130) says so;
  the handler is gone afterwards."""
  import keras

  class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      if int(self.model.optimizer.iterations.numpy()) == 3:
        os.kill(os.getpid(), signal.SIGINT)

  model = build()
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(errors.Preempted) as e:
    from test_reliability import AUG, OPTIM, _train_cfg

    from nnclr_tf import training
    training.pretrain(model, tf.distribute.get_strategy(), data.digits_source(),
                      data.DataConfig(image_size=16), AUG, _train_cfg(tmp_path, 20), OPTIM,
                      callbacks=[Interrupt()])
  assert e.value.exit_code == errors.EXIT_SIGINT == 130 and "SIGINT at step 4" in str(e.value)
  assert checkpoint_steps(tmp_path) == [4]
  assert signal.getsignal(signal.SIGINT) is before


class _Opt:
  def __init__(self):
    self.iterations = tf.Variable(0, dtype=tf.int64)
    self.learning_rate = 0.5


class _Model:
  def __init__(self):
    self.optimizer = _Opt()


def test_curves_hold_per_step_values_not_running_epoch_means(tmp_path):
  """Keras's logs are running means since the epoch began; the CSV holds each step's own value
  (every_steps=1) or the mean since the previous row (every_steps=3), epoch after epoch."""
  rng = np.random.default_rng(0)
  per_step = rng.uniform(1, 5, size=(2, 7))  # 2 epochs of 7 steps
  for every in (1, 3):
    path = str(tmp_path / f"c{every}.csv")
    logger = monitors.CurveLogger(path, every)
    logger.set_model(_Model())
    for epoch in range(2):
      logger.on_epoch_begin(epoch)
      for b in range(7):
        logger.model.optimizer.iterations.assign_add(1)
        running = float(np.float32(per_step[epoch, :b + 1].mean()))
        logger.on_train_batch_end(b, {"loss": running})
      logger.on_epoch_end(epoch, {"loss": running})
    curves = monitors.read_curves(path)
    flat = per_step.reshape(-1)
    steps = curves["step"].astype(int)
    expect = []
    prev = 0
    for s in steps:  # the oracle: the mean of the step values since the previous row
      lo = max(prev, (s - 1) // 7 * 7)
      expect.append(flat[lo:s].mean())
      prev = s
    np.testing.assert_allclose(curves["loss"], expect, rtol=1e-5)
    assert logger.last_logs["loss"] == pytest.approx(per_step[1].mean(), rel=1e-6)
    if every == 1:
      np.testing.assert_allclose(curves["loss"], flat, rtol=1e-5)
      assert list(steps) == list(range(1, 15))


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
  d = str(tmp_path / "m")
  with md.RunLock(d, "knn_eval") as outer:
    holder = json.load(open(os.path.join(d, md.LOCK)))
    assert holder["pid"] == os.getpid() and holder["mode"] == "knn_eval"
    with md.RunLock(d, "export"):  # the same process: re-entrant
      pass
    assert os.path.exists(os.path.join(d, md.LOCK)) and outer.held
  assert not os.path.exists(os.path.join(d, md.LOCK))
  # Another live process on this host (pid 1) holds it.
  with open(os.path.join(d, md.LOCK), "w") as f:
    json.dump({"pid": 1, "host": socket.gethostname(), "mode": "pretrain", "started": "t"}, f)
  with pytest.raises(errors.ModelDirLockedError, match="in use by pid 1 on"):
    md.RunLock(d).acquire()
  assert cluster.is_chief_process('{"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", '
                             '"index": 0}}')
  assert not cluster.is_chief_process('{"cluster": {"worker": ["a", "b"]}, "task": {"type": '
                                 '"worker", "index": 1}}')


@pytest.mark.slow
def test_classifier_metadata_names_the_encoder_checkpoint(tmp_path):
  """linear_eval's classifier export records the checkpoint its probe was fitted on, the encoder
  export of that checkpoint and the probe's figures; --mode=export refuses to pair the probe with
  a newer checkpoint."""
  exp = Experiment.from_flagfile("quickstart", model_dir=str(tmp_path / "m"), width=8,
                                 proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16,
                                 batch_size=32, queue_size=256, verbose=0, train_steps=3,
                                 plots=False, knn_k=5, linear_l2="1e-3", val_images=100,
                                 random_init_baseline=False)
  r = experiment.pretrain(exp)
  assert "knn_top1_random_init" not in r  # the baseline is off
  lin = experiment.linear_eval(exp)
  assert "linear_top1_random_init" not in lin
  meta = json.load(open(os.path.join(lin["classifier_export_dir"], "assets.extra",
                                     "nnclr_tf.json")))
  ckpt = os.path.abspath(os.path.join(exp.train.model_dir, "ckpt-3"))
  assert meta["encoder_checkpoint"] == ckpt and meta["checkpoint_step"] == 3
  assert meta["encoder_export"] == r["export_dir"]
  assert meta["linear_eval"]["linear_top1"] == lin["linear_top1"]
  assert meta["pretraining"]["knn_top1"] == r["knn_top1"]
  longer = exp.replace(train_steps=4)
  experiment.pretrain(longer)
  out = experiment.export(longer)
  assert "classifier_export_dir" not in out  # the probe belongs to ckpt-3
