"""Cost of --deterministic: run.py on the quickstart preset, alternating without and with TF op
determinism, in fresh processes. Prints one JSON line: median training throughput (pairs/s, the
steps after the first), child CPU seconds per run, and whether the final losses repeat.

  python benchmarks/determinism_cost.py --reps=3 --epochs=4

Any other nnclr_tf flag given here is passed on to every run (--preset picks another flagfile).
Throughput on a shared machine is noisy: the load average is recorded next to the figures.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import run_settings
from nnclr_tf.config import SECTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "flags/quickstart.cfg"
# 4 of the preset's 20 epochs: enough steps after the first for a throughput median, short enough
# to run 2 x --reps times.
OVERRIDES = {"train_epochs": 4}
# What each run sets itself: the mode compared, its own model_dir, and a quiet stdout whose last
# line is the results JSON.
FIXED = ("deterministic", "model_dir", "verbose")


def one_run(deterministic, preset, run_flags, model_dir):
  """(pairs/s, child CPU seconds, final loss) of one run.py pretraining."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "run.py"), f"--flagfile={preset}",
       f"--model_dir={model_dir}", *run_settings.as_cli(run_flags), "--verbose=0",
       "--deterministic" if deterministic else "--nodeterministic"],
      cwd=REPO, capture_output=True, text=True, check=True)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  r = json.loads(p.stdout.strip().splitlines()[-1])
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return r["pairs_per_sec"], cpu, r["final_loss"]


def parser():
  ap = run_settings.Parser(PRESET, run_settings.flag_names(SECTIONS, exclude=FIXED),
                           overrides=OVERRIDES, aliases={"train_epochs": ["--epochs"]},
                           description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=3)
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  # run.py reads the flagfile itself; it is given only what differs from it.
  run_flags = {**OVERRIDES, **ap.given}
  load_start = os.getloadavg()[0]
  out = {False: [], True: []}
  with tempfile.TemporaryDirectory() as tmp:
    for rep in range(args.reps):
      for det in (False, True):
        out[det].append(one_run(det, args.preset, run_flags,
                                os.path.join(tmp, f"{det}-{rep}")))
  res = {"reps": args.reps, "epochs": exp.train.train_epochs, "load_avg_start": load_start,
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
