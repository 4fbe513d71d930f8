"""The two linear protocols on one pretrained model_dir, side by side: accuracy, wall time and
peak memory of `--mode=linear_eval` under `--linear_protocol=lbfgs` and `=sgd` (issue 25).

  python benchmarks/linear_protocols.py --model_dir=runs/quickstart \
      --flagfile=flags/quickstart.cfg --linear_epochs=20 --sgd_variant=--linear_lr=1

Each run is run.py in its own process on its own copy of the model_dir (so neither reads the
other's probe, feature cache or exports), one after the other; wall time and peak RSS are the
whole process's (TF import, restore, feature extraction or the streamed fit, scoring, the
classifier export), from wait4's rusage. `--sgd_variant` (repeatable) adds an sgd run with more
flags, e.g. another --linear_lr. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak  # noqa: E402

FIELDS = ("linear_top1", "linear_top1_random_init", "linear_top5", "train_examples",
          "eval_examples", "steps", "epochs", "batch_size", "learning_rate", "fit_seconds",
          "l2", "converged")


def parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model_dir", required=True, help="A finished pretraining's model_dir.")
  p.add_argument("--flagfile", required=True, help="The preset it was pretrained with.")
  p.add_argument("--linear_epochs", type=int, default=20)
  p.add_argument("--sgd_variant", action="append", default=[],
                 help="Extra run.py flags of one more sgd run (quoted, space-separated).")
  p.add_argument("--run_flag", action="append", default=[], help="Extra flag for every run.")
  p.add_argument("--workdir", default="/tmp/nnclr_linear_protocols", help="Emptied first.")
  return p


def run(args, name, protocol, extra):
  """One linear_eval in a fresh copy of the model_dir: (results row, wall s, peak RSS MB)."""
  copy = os.path.join(args.workdir, name)
  shutil.copytree(args.model_dir, copy, symlinks=True)
  cmd = [sys.executable, os.path.join(REPO, "run.py"), "--mode=linear_eval",
         f"--flagfile={args.flagfile}", f"--model_dir={copy}", f"--linear_protocol={protocol}",
         f"--linear_epochs={args.linear_epochs}", "--verbose=0", *args.run_flag, *extra]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  with open(copy + ".log", "w") as log:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{name}: run.py exited {os.waitstatus_to_exitcode(status)}; see "
                     f"{copy}.log")
  with open(os.path.join(copy, "linear_eval_results.json")) as f:
    results = json.load(f)
  row = {"run": name, "protocol": protocol, "flags": extra,
         **{k: results[k] for k in FIELDS if k in results},
         "wall_seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
  return row


def main(argv=None):
  args = parser().parse_args(argv)
  if not os.path.isfile(os.path.join(args.model_dir, "checkpoint")):
    raise SystemExit(f"--model_dir={args.model_dir} holds no checkpoint; pretrain it first")
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  load = peak.load_average()
  plan = [("lbfgs", "lbfgs", []), ("sgd", "sgd", [])]
  plan += [(f"sgd_{i + 1}", "sgd", shlex.split(v)) for i, v in enumerate(args.sgd_variant)]
  rows = [run(args, *p) for p in plan]
  print(json.dumps({"benchmark": "linear_protocols", "model_dir": args.model_dir,
                    "flagfile": args.flagfile, "linear_epochs": args.linear_epochs, "runs": rows,
                    "device": peak.machine(), "load_average_before": load,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
