"""A kill campaign: a pretraining run SIGKILLed at seeded random moments and restarted by the same
command each time, against an uninterrupted run of that command (issue 28; not a test, though
tests/test_chaos.py runs a 3-kill version).

Each kill is one of
  time        a seeded moment of training: a seeded delay (0-1 s) after curves.csv reaches a
              seeded step (the first time kill: 0-4 s after the start, in start-up);
  checkpoint  while a checkpoint is being written (a ckpt-N_temp/ folder exists), N a seeded
              step at least two intervals past the step the run resumed from;
  features    while the feature cache is being written (features/.tmp-*);
  export      while an export is being written (export/encoder/.tmp-*).
A run meets each moment once, so the kills come in the order of the run: time and checkpoint
kills by step, then the feature-cache kills (a run killed there extracts them again when rerun),
then the export kills. The filesystem is polled every ~2 ms (without pause once training has
ended, for the short feature-cache write); a window the run passes before the poll sees it is
recorded as missed, and the campaign goes on. After the planned kills the command
is rerun until it exits 0. Then: the final checkpoint must equal the uninterrupted run's tensor
for tensor (`--deterministic`), every export version must load and serve, pretrain_results.json
must be whole, no temporary file of a killed writer may be left, and no kill may lose more steps
than the checkpoint interval. Lost steps of a kill = the newest step in curves.csv when it
landed (the quickstart writes a row per step) minus the step the next start resumed from (its
newest intact checkpoint).

  python benchmarks/chaos.py --kills=20 --seed=0

prints one JSON object; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
KINDS = ("time", "checkpoint", "features", "export")
HOST = socket.gethostname()  # temporary names are .tmp-<host>-<pid>-... (model_dir.temp_prefix)


def parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="/tmp/nnclr_chaos", help="Emptied first.")
  p.add_argument("--checkpoint_every_steps", type=int, default=11,
                 help="The interval no kill may lose more than (11: an epoch of the quickstart).")
  p.add_argument("--flagfile", default=os.path.join(REPO, "flags", "quickstart.cfg"))
  p.add_argument("--run_flag", action="append", default=[],
                 help="Extra run.py flag for both runs, e.g. --run_flag=--train_steps=40.")
  p.add_argument("--kinds", type=lambda v: v.split(","), default=list(KINDS),
                 help=f"Kinds of kill, cycled over --kills then shuffled: {','.join(KINDS)}.")
  p.add_argument("--max_restarts", type=int, default=10,
                 help="Reruns after the last kill before giving up.")
  return p


def command(args, model_dir):
  return [sys.executable, os.path.join(REPO, "run.py"), "--mode=pretrain",
          f"--flagfile={args.flagfile}", f"--model_dir={model_dir}", "--deterministic",
          f"--seed={args.seed}", f"--checkpoint_every_steps={args.checkpoint_every_steps}",
          "--verbose=0", *args.run_flag]


def start(cmd, log):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                            start_new_session=True)


def kill(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait(timeout=60)


def triggered(kind, model_dir, from_step=0, pid=None):
  """Whether the window of a triggered kill is open now (for a checkpoint: that of a checkpoint
  of step `from_step` or later; for the others, a temporary file of process `pid`'s: the one a
  killed writer left is not a window)."""
  if kind == "checkpoint":
    return any(int(os.path.basename(p)[5:-5]) >= from_step
               for p in glob.glob(os.path.join(model_dir, "ckpt-*_temp")))
  folder = os.path.join(model_dir, *(("features",) if kind == "features" else ("export",
                                                                              "encoder")))
  try:
    return any(name.startswith(f".tmp-{HOST}-{pid}-") for name in os.listdir(folder))
  except OSError:
    return False


def step_reached(model_dir):
  """The newest step curves.csv holds (0 without one)."""
  from nnclr_tf import monitors
  path = os.path.join(model_dir, "curves.csv")
  if not os.path.exists(path):
    return 0
  rows = monitors.parse_rows(path)[1]
  return max((int(float(r["step"])) for r in rows), default=0)


def resume_step(model_dir):
  from nnclr_tf import checkpoints
  try:
    newest = checkpoints.newest_intact(model_dir)
  except Exception:  # noqa: BLE001 -- none intact yet: the run starts from step 0
    return 0
  return checkpoints.checkpoint_step(newest) if newest else 0


def checkpoint_tensors(path):
  import tensorflow as tf
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k, _ in tf.train.list_variables(path)
          if "save_counter" not in k}


def same_checkpoint(a, b):
  import numpy as np
  ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
  return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def exports_load(model_dir):
  """(loaded, failed) version folders under model_dir/export/*/ (integer names only: a
  .tmp-* folder is not a version and no server reads it)."""
  import numpy as np
  import tensorflow as tf
  loaded, failed = [], []
  for version in sorted(glob.glob(os.path.join(model_dir, "export", "*", "*"))):
    if not os.path.basename(version).isdigit():
      continue
    try:
      served = tf.saved_model.load(version).signatures["serving_default"]
      served(tf.constant(np.zeros((1, 16, 16, 3), np.uint8)))
      loaded.append(os.path.relpath(version, model_dir))
    except Exception as e:  # noqa: BLE001 -- any failure to load or serve is the finding
      failed.append(f"{os.path.relpath(version, model_dir)}: {type(e).__name__}")
  return loaded, failed


def leftovers(model_dir):
  return sorted(os.path.relpath(p, model_dir) for p in
                glob.glob(os.path.join(model_dir, "**", ".tmp-*"), recursive=True)
                + glob.glob(os.path.join(model_dir, "ckpt-*_temp")))


def plan(args, total):
  """The seeded kills in the order the run meets them: (kind, step, delay). A run passes each
  moment once, so the kills are placed along it: time and checkpoint kills at seeded steps of
  training (sorted; the first time kill in start-up), then the feature-cache kills (each rerun of
  a run killed there extracts the features again), then the export kills."""
  rng = random.Random(args.seed)
  kinds = [args.kinds[i % len(args.kinds)] for i in range(args.kills)]
  training, first_time = [], True
  for kind in (k for k in kinds if k in ("time", "checkpoint")):
    if kind == "time" and first_time:
      training.append((kind, 0, rng.uniform(0.0, 4.0)))  # start-up: before the first step
      first_time = False
    else:
      training.append((kind, rng.randint(1, total), rng.uniform(0.0, 1.0)))
  training.sort(key=lambda k: k[1])
  return training + [(k, total, 0.0) for k in ("features", "export") for j in kinds if j == k]


def checkpoint_target(resumed, total, interval, step):
  """The first step whose checkpoint write is killed: `step`, but at least two intervals past the
  resumed step where the run allows, so the restart resumes from a checkpoint this run wrote (a
  kill at the first one would resume from the same step again); the final checkpoint is one."""
  low = resumed + 2 * interval
  if low > total:
    return resumed + 1
  return max(step, low)


def last_step(model_dir):
  """The step of curves.csv's last row, from the file's tail (cheap enough to poll)."""
  try:
    with open(os.path.join(model_dir, "curves.csv"), "rb") as f:
      f.seek(max(0, os.fstat(f.fileno()).st_size - 512))
      tail = f.read().decode("utf-8", "replace").strip().splitlines()
    return int(float(tail[-1].split(",", 1)[0])) if tail else 0
  except (OSError, ValueError, IndexError):
    return 0


def campaign(args):
  from nnclr_tf import checkpoints
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  reference, killed = (os.path.join(args.workdir, n) for n in ("reference", "killed"))
  t0 = time.time()
  proc = start(command(args, reference), os.path.join(args.workdir, "reference"))
  if proc.wait() != 0:
    raise SystemExit(f"the uninterrupted run failed: see {args.workdir}/reference.err")
  reference_seconds = time.time() - t0
  total = checkpoints.checkpoint_step(checkpoints.latest_checkpoint(reference))

  kills, restarts, cmd, starts = [], 0, command(args, killed), []
  t0 = time.time()
  for i, (kind, step, delay) in enumerate(plan(args, total)):
    resumed = resume_step(killed)
    starts.append(resumed)
    if kills and kills[-1]["landed"]:
      kills[-1]["lost_steps"] = max(0, kills[-1]["step_reached"] - resumed)
    target = checkpoint_target(resumed, total, args.checkpoint_every_steps, step)
    proc = start(cmd, os.path.join(args.workdir, f"run{i}"))
    began, landed, due, armed = time.time(), False, None, False
    while proc.poll() is None:
      if kind == "time":
        if due is None and (step == 0 or last_step(killed) >= step):
          due = time.time() + delay
        fire = due is not None and time.time() >= due
      else:
        fire = triggered(kind, killed, target, proc.pid)
        # Writing the feature cache of a small run takes a few ms, less than a poll: once
        # training has ended, poll without sleeping (one core, for the few seconds left).
        armed = armed or (kind in ("features", "export") and last_step(killed) >= total)
      if fire:
        reached = step_reached(killed)
        kill(proc)
        landed = True
        break
      if not armed:
        time.sleep(0.002)
    record = {"kind": kind, "landed": landed, "resumed_from": resumed}
    if kind == "time":
      record["after_step"], record["delay_seconds"] = step, round(delay, 3)
    if kind == "checkpoint":
      record["checkpoint_from_step"] = target
    if landed:
      record["step_reached"] = reached
      record["seconds_into_run"] = round(time.time() - began, 2)
    else:
      record["exit"] = proc.returncode  # the run ended before the window came
    kills.append(record)
  while True:
    resumed = resume_step(killed)
    starts.append(resumed)
    if kills and kills[-1].get("landed") and "lost_steps" not in kills[-1]:
      kills[-1]["lost_steps"] = max(0, kills[-1]["step_reached"] - resumed)
    code = start(cmd, os.path.join(args.workdir, f"final{restarts}")).wait()
    restarts += 1
    if code == 0 or restarts > args.max_restarts:
      break
  campaign_seconds = time.time() - t0

  final = checkpoints.latest_checkpoint(killed)
  want = checkpoints.latest_checkpoint(reference)
  identical = bool(final and want and os.path.basename(final) == os.path.basename(want)
                   and same_checkpoint(final, want))
  loaded, failed = exports_load(killed)
  try:
    with open(os.path.join(killed, "pretrain_results.json")) as f:
      results_steps = json.load(f).get("steps")
  except (OSError, ValueError):
    results_steps = None
  landed = [k for k in kills if k["landed"]]
  lost = [k.get("lost_steps", 0) for k in landed]
  out = {
      "kills_planned": {k: sum(r["kind"] == k for r in kills) for k in args.kinds},
      "kills_landed": {k: sum(r["kind"] == k and r["landed"] for r in kills) for k in args.kinds},
      "resumed_mid_run": sum(0 < r < total for r in starts), "start_steps": starts,
      "kills_survived": len(landed) if code == 0 else 0,
      "lost_steps": {"max": max(lost, default=0),
                     "mean": round(sum(lost) / len(lost), 2) if lost else 0.0, "each": lost},
      "checkpoint_every_steps": args.checkpoint_every_steps,
      "final_exit": code, "restarts_after_last_kill": restarts,
      "final_checkpoint": os.path.basename(final or ""), "bit_identical": identical,
      "exports_loaded": loaded, "exports_failed": failed,
      "pretrain_results_steps": results_steps, "leftover_temp_files": leftovers(killed),
      "campaign_seconds": round(campaign_seconds, 1),
      "reference_seconds": round(reference_seconds, 1), "kills": kills}
  out["ok"] = (code == 0 and identical and not failed and bool(loaded)
               and results_steps is not None and not out["leftover_temp_files"]
               and max(lost, default=0) <= args.checkpoint_every_steps)
  return out


def main(argv=None):
  p = parser()
  args = p.parse_args(argv)
  if not args.kinds or set(args.kinds) - set(KINDS):
    p.error(f"--kinds={','.join(args.kinds)}: choose among {','.join(KINDS)}")
  out = campaign(args)
  print(json.dumps(out))
  return 0 if out["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
