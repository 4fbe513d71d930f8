"""run.py across processes: two MultiWorkerMirroredStrategy workers on 127.0.0.1 against one
process, resume on both workers, a SIGTERM to one worker stopping both at one step, and the clear
refusals of --strategy=tpu / multi_worker.

Every child has a deadline and is killed (with its process group) if the test fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from test_operations import curve_step, wait_for

import tolerances
from conftest import REPO
from nnclr_tf import checkpoints

pytestmark = pytest.mark.slow  # run.py processes end to end

# A small lr keeps float reduction-order differences (1e-7) from being amplified by LARS.
COMMON = ["--flagfile=flags/quickstart.cfg", "--seed=7", "--learning_rate=0.05",
          "--val_images=0", "--proj_hidden_dim=64", "--pred_hidden_dim=64", "--width=16",
          "--verbose=0"]
DEADLINE = 150  # seconds per group of concurrent children


def free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def tf_config(ports, index):
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


class Children:
  """Starts run.py children; `wait` returns their (returncode, stdout, stderr) or kills them all."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.procs = []

  def start(self, name, args, tf_config_json=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    if tf_config_json:
      env["TF_CONFIG"] = tf_config_json
    out = open(os.path.join(self.log_dir, f"{name}.out"), "w+")
    err = open(os.path.join(self.log_dir, f"{name}.err"), "w+")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=REPO, env=env,
                         stdout=out, stderr=err, start_new_session=True)
    self.procs.append((name, p, out, err))

  def kill(self):
    for _, p, _, _ in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def wait(self, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    try:
      for _name, p, _, _ in self.procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
      self.kill()
    results = {}
    for name, p, out, err in self.procs:
      out.seek(0)
      err.seek(0)
      results[name] = (p.returncode, out.read(), err.read())
      out.close()
      err.close()
    self.procs = []
    return results


def assert_same(init, ckpt, ref):
  assert ckpt.keys() == ref.keys()
  keys = " ".join(ref)
  assert "support_set/embeddings" in keys and "moving_variance" in keys
  assert "_trainable_variables" in keys
  tolerances.assert_trained_close(init, ref, ckpt)


def last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def test_two_workers_equal_one_process_and_resume(tmp_path, record_property):
  """2 workers x 1 CPU replica, global batch 128, 3 steps, then resumed to 4 steps: the chief's
  checkpoint equals a single process's after 3 and after 4 steps (support set, weights, BN
  statistics, optimizer state) up to cross-kernel rounding (tolerances.py), both workers resume,
  and only the chief writes to model_dir."""
  mw, ref = str(tmp_path / "mw"), str(tmp_path / "ref")
  kids = Children(str(tmp_path))
  init = None
  try:
    for steps in (3, 4):
      ports = free_ports(2)
      for i in range(2):
        kids.start(f"w{i}_{steps}", [*COMMON, f"--train_steps={steps}", f"--model_dir={mw}",
                                     "--strategy=multi_worker"], tf_config(ports, i))
      kids.start(f"ref_{steps}", [*COMMON, f"--train_steps={steps}", f"--model_dir={ref}"])
      out = kids.wait()
      for name, (code, _, err) in out.items():
        assert code == 0, f"{name} exited {code}:\n{err[-3000:]}"
      chief, worker, single = (last_json(out[f"{n}_{steps}"][1]) for n in ("w0", "w1", "ref"))
      assert chief["replicas"] == 2 and single["replicas"] == 1
      assert chief["steps"] == worker["steps"] == steps
      assert chief["resumed_from_step"] == worker["resumed_from_step"] == (0 if steps == 3 else 3)
      assert chief["final_loss"] == worker["final_loss"]
      record_property(f"loss_gap_{steps}", tolerances.loss_gap(single["final_loss"],
                                                                chief["final_loss"]))
      tolerances.assert_loss_close(single["final_loss"], chief["final_loss"])
      ckpt, reference = tolerances.checkpoint(mw), tolerances.checkpoint(ref)
      if init is None:
        init = tolerances.initial_checkpoint(ref, str(tmp_path))
        queue = "model/support_set/embeddings/.ATTRIBUTES/VARIABLE_VALUE"
        # The rebuilt start is the run's: the rows 3 steps of 128 did not reach are its own.
        assert np.all(init[queue] == reference[queue], axis=1).sum() == 1024 - 3 * 128
      record_property(f"divergence_{steps}", tolerances.divergence(init, reference, ckpt))
      assert_same(init, ckpt, reference)
      assert int(ckpt["model/support_set/pointer/.ATTRIBUTES/VARIABLE_VALUE"]) == steps * 128
      # The other worker checkpoints into its own folder, and it holds the same state.
      private = tolerances.checkpoint(os.path.join(mw, ".workers", "worker_1"))
      for k in ckpt:
        np.testing.assert_array_equal(private[k], ckpt[k], err_msg=k)
  finally:
    kids.kill()
  assert sorted(os.listdir(os.path.join(mw, "export", "encoder"))) == ["1", "2"]
  assert not {"pretrain_results.json", "export", "flags.txt"} & set(
      os.listdir(os.path.join(mw, ".workers", "worker_1")))


def test_sigterm_on_one_worker_stops_both_at_one_step_and_both_resume(tmp_path, record_property):
  """SIGTERM to the non-chief worker only, mid-epoch: through the per-step collective the chief
  stops after the same step, both save that step and exit 143 with one `stopped:` line; the same
  commands resume on both, and the chief's final checkpoint equals a straight single-process run
  of the same steps (tolerances.py)."""
  # Short: FRAC is set for a few steps (cross-kernel rounding had grown to 0.013 of the change by
  # step 10, 0.07 by step 28).
  steps = 6
  mw, ref = str(tmp_path / "mw"), str(tmp_path / "ref")
  worker_dir = os.path.join(mw, ".workers", "worker_1")
  args = [*COMMON, f"--train_steps={steps}", f"--model_dir={mw}", "--strategy=multi_worker"]
  kids = Children(str(tmp_path))
  try:
    ports = free_ports(2)
    for i in range(2):
      kids.start(f"w{i}", args, tf_config(ports, i))
    victim = kids.procs[1][1]
    assert wait_for(lambda: curve_step(worker_dir) >= 2, victim, DEADLINE), "training never started"
    os.kill(victim.pid, signal.SIGTERM)
    out = kids.wait()
    stopped_at = {}
    for name, folder in (("w0", mw), ("w1", worker_dir)):
      code, _, err = out[name]
      assert code == 143, f"{name} exited {code}:\n{err[-3000:]}"
      lines = [line for line in err.splitlines() if line.startswith("stopped:")]
      assert len(lines) == 1 and "SIGTERM at step " in lines[0], err[-2000:]
      assert "Traceback" not in err
      step = int(lines[0].split("SIGTERM at step ")[1].split(":")[0])
      assert checkpoints.checkpoint_step(tf.train.latest_checkpoint(folder)) == step
      stopped_at[name] = step
    assert stopped_at["w0"] == stopped_at["w1"], stopped_at
    stop = stopped_at["w0"]
    assert 2 <= stop < steps
    record_property("stopped_at", stop)

    ports = free_ports(2)
    for i in range(2):
      kids.start(f"w{i}", args, tf_config(ports, i))
    kids.start("ref", [*COMMON, f"--train_steps={steps}", f"--model_dir={ref}"])
    out = kids.wait()
    for name, (code, _, err) in out.items():
      assert code == 0, f"{name} exited {code}:\n{err[-3000:]}"
    chief, worker = last_json(out["w0"][1]), last_json(out["w1"][1])
    assert chief["resumed_from_step"] == worker["resumed_from_step"] == stop
    assert chief["steps"] == worker["steps"] == steps
    ckpt, reference = tolerances.checkpoint(mw), tolerances.checkpoint(ref)
    init = tolerances.initial_checkpoint(ref, str(tmp_path))
    record_property("divergence", tolerances.divergence(init, reference, ckpt))
    assert_same(init, ckpt, reference)
  finally:
    kids.kill()


def test_tpu_and_multi_worker_refusals_are_one_clear_line(tmp_path):
  kids = Children(str(tmp_path))
  try:
    kids.start("tpu", [*COMMON, f"--model_dir={tmp_path}/t", "--strategy=tpu"])
    kids.start("mw", [*COMMON, f"--model_dir={tmp_path}/m", "--strategy=multi_worker"])
    out = kids.wait(timeout=120)
  finally:
    kids.kill()
  code, _, err = out["tpu"]
  assert code == 2 and "Traceback" not in err
  assert "error: --strategy=tpu: no TPU found" in err and "--tpu=<name>" in err
  code, _, err = out["mw"]
  assert code == 2 and "Traceback" not in err
  assert "error: --strategy=multi_worker needs the TF_CONFIG environment variable" in err
