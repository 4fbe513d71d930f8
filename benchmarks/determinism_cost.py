"""Cost of --deterministic: run.py on the quickstart preset, alternating without and with TF op
determinism, in fresh processes. Prints one JSON line: median training throughput (pairs/s, the
steps after the first), child CPU seconds per run, and whether the final losses repeat.

  python benchmarks/determinism_cost.py --reps=3 --epochs=4

Throughput on a shared machine is noisy: the load average is recorded next to the figures.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(deterministic, epochs, model_dir):
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "run.py"), "--flagfile=flags/quickstart.cfg",
       f"--model_dir={model_dir}", f"--train_epochs={epochs}", "--verbose=0",
       "--deterministic" if deterministic else "--nodeterministic"],
      cwd=REPO, capture_output=True, text=True, check=True)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  r = json.loads(p.stdout.strip().splitlines()[-1])
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return r["pairs_per_sec"], cpu, r["final_loss"]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=4)
  args = ap.parse_args()
  load_start = os.getloadavg()[0]
  out = {False: [], True: []}
  with tempfile.TemporaryDirectory() as tmp:
    for rep in range(args.reps):
      for det in (False, True):
        out[det].append(one_run(det, args.epochs, os.path.join(tmp, f"{det}-{rep}")))
  res = {"reps": args.reps, "epochs": args.epochs, "load_avg_start": load_start,
         "load_avg_end": os.getloadavg()[0]}
  for det, name in ((False, "default"), (True, "deterministic")):
    res[f"{name}_pairs_per_sec_median"] = statistics.median(x[0] for x in out[det])
    res[f"{name}_pairs_per_sec_all"] = [round(x[0], 1) for x in out[det]]
    res[f"{name}_cpu_s_median"] = statistics.median(x[1] for x in out[det])
    res[f"{name}_losses_repeat"] = len({x[2] for x in out[det]}) == 1
  res["throughput_ratio"] = (res["deterministic_pairs_per_sec_median"] /
                             res["default_pairs_per_sec_median"])
  res["same_loss_across_modes"] = out[False][0][2] == out[True][0][2]
  print(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
  main()
