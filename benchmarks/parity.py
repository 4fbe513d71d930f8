"""Equal-work parity with the peer (lightly): the same recipe, steps, batch and images on each side,
scored by the same weighted kNN.

1. Carves a class-balanced validation split out of a folder of class sub-folders (default the
   50,000 CIFAR-10 training JPEGs): --split_dir/train (45,000) and --split_dir/val (5,000), as
   symlinks. The split depends on --split_seed only, so every run of the protocol shares it.
2. Trains --steps steps at --batch_size of flags/cifar10_resnet18_lightly.cfg here (through
   nnclr_tf.experiment, cosine over the steps) and/or of lightly's code
   (../shared/peers/lightly/knn_budget.py in its own Python, a subprocess: the peer is never
   imported).
3. Scores each backbone by weighted kNN (k=200, T=0.1) of the val images against the train images
   as the bank, at random initialisation and after training.

One JSON line per run (side, seed, steps, knn_top1, pairs/s, seconds) is printed and appended to
--results, so the protocol can run in parts; `--summary` prints the mean per side and setting.

  python benchmarks/parity.py --side=both --seed=0 --steps=300 \
      --peer_python=/work/peerenv/bin/python

--use_nn, --symmetric_loss and --weight_decay_mode change our side only (the ablations): the peer
script runs lightly's recipe as published and has no such switches.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As run.py: the default Eigen convolutions are much slower than oneDNN's on these CPUs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import run_settings  # noqa: E402
from peer_compare import last_json_line  # noqa: E402

DEFAULT_PEER_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "peers", "lightly"))
DEFAULT_SOURCE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10",
                                               "train"))
PRESET = "cifar10_resnet18_lightly"
ABLATIONS = ("use_nn", "symmetric_loss", "weight_decay_mode")
# What our side records besides the ablations, so that --summary keeps runs of a changed preset
# apart; LEGACY_SETTINGS is what older result lines ran with (the preset's zero-init residual
# blocks until the preset matched lightly's gamma 1; the preset's support set before the size was
# recorded).
RECORDED = ABLATIONS + ("zero_init_residual", "queue_size")
LEGACY_SETTINGS = {"ours": {"zero_init_residual": True, "queue_size": 4096}}
# Our side's run flags on the command line: the ablations, and the seed and batch the peer gets
# too (default: the preset's).
RUN_FLAGS = ABLATIONS + ("seed", "batch_size", "verbose")
# One line per epoch: a run takes the better part of an hour and its log is read afterwards.
OVERRIDES = {"verbose": 2}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def carve_split(source, split_dir, val_images, seed):
  """split_dir/{train,val}/<class>/<file> symlinks into `source`: `val_images` held out, equal per
  class (the remainder spread over the first classes of a seeded order). An existing split made
  with the same arguments is reused; one made otherwise is an error (runs must share it)."""
  import numpy as np
  manifest = os.path.join(split_dir, "split.json")
  want = {"source": os.path.abspath(source), "val_images": val_images, "seed": seed}
  if os.path.exists(manifest):
    with open(manifest) as f:
      have = json.load(f)
    if {k: have.get(k) for k in want} != want:
      raise SystemExit(f"error: {split_dir} holds a split made with {have}; this run asks for "
                       f"{want}. Use another --split_dir")
    return have
  classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
  if len(classes) < 2:
    raise SystemExit(f"error: {source} needs class sub-folders")
  files = {c: sorted(f for f in os.listdir(os.path.join(source, c))
                     if f.lower().endswith(IMAGE_EXTENSIONS)) for c in classes}
  rng = np.random.default_rng(seed)
  take = {c: val_images // len(classes) for c in classes}
  for c in rng.permutation(classes)[: val_images % len(classes)]:
    take[str(c)] += 1
  tmp = split_dir + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  counts = {"train": 0, "val": 0}
  for c in classes:
    if take[c] >= len(files[c]):
      raise SystemExit(f"error: class {c} has {len(files[c])} images, {take[c]} asked for val")
    order = rng.permutation(len(files[c]))
    held = set(order[: take[c]].tolist())
    for part in ("train", "val"):
      os.makedirs(os.path.join(tmp, part, c))
    for i, name in enumerate(files[c]):
      part = "val" if i in held else "train"
      os.symlink(os.path.abspath(os.path.join(source, c, name)), os.path.join(tmp, part, c, name))
      counts[part] += 1
  have = {**want, "classes": classes, "train_images": counts["train"],
          "val_images_made": counts["val"]}
  with open(os.path.join(tmp, "split.json"), "w") as f:
    json.dump(have, f)
  if os.path.exists(split_dir):
    shutil.rmtree(split_dir)
  os.rename(tmp, split_dir)  # whole or absent: an interrupted carve leaves only the .partial
  return have


def ours_experiment(args, split, model_dir):
  """The preset with the run flags given (args.ours_flags), this protocol's data, length and
  model_dir, and last the --override items."""
  from nnclr_tf.config import Experiment
  protocol = dict(dataset="folder", image_dir=os.path.join(split, "train"),
                  eval_image_dir=os.path.join(split, "val"), val_images=0,
                  train_steps=args.steps, model_dir=model_dir, plots=False, online_probe=False)
  # The monitor's interval: every point asked for, and the last step, is a multiple of it; none
  # without --eval_at (the preset's own interval would add a pass at the last step).
  protocol.update(knn_every_steps=math.gcd(args.steps, *args.eval_at) if args.eval_at else 0,
                  knn_monitor_bank=0)
  return Experiment.from_flagfile(args.preset, **{**OVERRIDES, **args.ours_flags, **protocol,
                                                  **parse_overrides(args.override)})


def parse_overrides(items):
  """{flag: value} of "flag=value" strings, typed by the Experiment's own flag definitions."""
  from absl import flags

  from nnclr_tf import config, flagfiles
  fv = flags.FlagValues()
  config.define_flags(fv)
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    flagfiles.parse(["parity", f"--{key}={value}"], fv)
    out[key] = fv[key].value
  return out


def run_ours(args, split):
  from nnclr_tf import cli
  model_dir = os.path.join(args.work_dir, f"ours_seed{args.seed}_steps{args.steps}_"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
  exp = ours_experiment(args, split, model_dir)
  t0 = time.perf_counter()
  with cli.native_start_up_filtered():  # as run.py: no TF start-up noise (cuInit "errors")
    from nnclr_tf import experiment
    strategy = experiment.setup(exp)
  r = experiment.pretrain(exp, strategy)
  seconds = time.perf_counter() - t0
  values = exp.flag_values()
  settings = {n: values[n] for n in RECORDED}
  return {"knn_top1": r.get("knn_top1"), "knn_top1_random_init": r.get("knn_top1_random_init"),
          "knn_curve": curve_with_label_hit(r.get("knn_curve"), model_dir, exp.support.use_nn),
          "knn_monitor_seconds": r.get("knn_monitor_seconds"),
          "pairs_per_s": r.get("pairs_per_sec"), "steps_done": r["steps"],
          "pairs_per_s_after_first_step": r.get("pairs_per_sec"),
          "final_loss": r.get("final_loss"), "seconds": seconds, "settings": settings,
          "train_images": r.get("train_examples"), "eval_images": r.get("eval_examples"),
          "model_dir": model_dir,
          "pairs_per_s_note": "steps after the first (the first traces the graph)"}


def curve_with_label_hit(curve, model_dir, use_nn=True, window=20):
  """The kNN points of our run, each with the mean NN label-hit over the `window` steps up to it
  (curves.csv), the share of positives of the same class as their query at that point (None
  without the NN positive: SimCLR's curves.csv holds 0 there, a metric it does not compute)."""
  if not curve or not use_nn:
    return [{**p, "nn_label_hit": None} for p in curve or []] or curve
  from nnclr_tf import model_dir as md
  from nnclr_tf import monitors
  rows = monitors.read_curves(md.path(model_dir, md.CURVES))
  out = []
  for point in curve:
    near = (rows["step"] > point["step"] - window) & (rows["step"] <= point["step"])
    hit = rows["nn_label_hit"][near]
    hit = hit[np.isfinite(hit)]
    out.append({**point, "nn_label_hit": float(hit.mean()) if len(hit) else None})
  return out


def peer_rate_after_first_step(lines, steps, batch_size, train_seconds):
  """The peer's pairs/s over the steps after the first, ours's convention: its JSON counts every
  step (the first includes the data loader's start-up); its log line `step 1 ep 0 13s ...` gives
  the first step's end (whole seconds: at most 0.5 s off over an hour's run). None without it."""
  for line in lines:
    m = re.match(r"step 1 ep \d+ (\d+)s ", line)
    if m and train_seconds and steps and steps > 1:
      return (steps - 1) * batch_size / (train_seconds - int(m.group(1)))
  return None


def run_peer(args, split):
  script = os.path.join(args.peer_dir, "knn_budget.py")
  cmd = [args.peer_python, script, "--train_dir", os.path.join(split, "train"),
         "--eval_dir", os.path.join(split, "val"), "--steps", str(args.steps),
         "--batch_size", str(args.batch_size), "--seed", str(args.seed)] + args.peer_flags.split()
  if args.eval_at:
    cmd += ["--eval_at", ",".join(str(s) for s in args.eval_at)]
  t0 = time.perf_counter()
  # The peer logs its progress to stderr (every 10 steps); pass it on as it comes, since a run takes
  # the better part of an hour, and keep the tail for the error message.
  tail = collections.deque(maxlen=8)
  first = []  # the log line of step 1, for the rate after it
  with subprocess.Popen(cmd, cwd=args.peer_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as proc:
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    for line in proc.stderr:
      tail.append(line.rstrip())
      if not first and line.startswith("step 1 "):
        first.append(line)
      print(f"peer: {line.rstrip()}", file=sys.stderr, flush=True)
    reader.join()
    returncode = proc.wait()
    timer.cancel()
  seconds = time.perf_counter() - t0
  if returncode:
    raise SystemExit(f"error: the peer exited {returncode}:\n" + "\n".join(tail))
  r = last_json_line(out[0])
  train = r.get("train", {})
  return {"knn_top1": r.get("knn_top1_after"), "knn_top1_random_init": r.get("knn_top1_before"),
          "knn_curve": r.get("knn_curve"),
          "pairs_per_s": train.get("pairs_per_s"), "steps_done": train.get("steps"),
          "pairs_per_s_after_first_step": peer_rate_after_first_step(
              first, train.get("steps"), args.batch_size, train.get("train_seconds")),
          "final_loss": train.get("loss_last10_mean"), "seconds": seconds,
          "settings": {"use_nn": True, "symmetric_loss": "lightly NT-Xent",
                       "weight_decay_mode": "coupled"},
          "train_images": r.get("config", {}).get("train_images"),
          "eval_images": r.get("config", {}).get("test_images"), "peer_cmd": cmd,
          "versions": r.get("versions"),
          "pairs_per_s_note": "every step, data waits included; pairs_per_s_after_first_step "
                              "leaves step 1 out, as ours does"}


def summarise(path):
  """{(side, settings as JSON): {runs, seeds, knn_top1_mean, pairs_per_s_mean and, where the
  runs have it, pairs_per_s_after_first_step_mean}} of a results file; runs of other step counts
  are kept apart."""
  groups = collections.defaultdict(list)
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        settings = {**LEGACY_SETTINGS.get(r["side"], {}), **r["settings"]}
        groups[(r["side"], r["steps"], json.dumps(settings, sort_keys=True))].append(r)
  out = []
  for (side, steps, settings), runs in sorted(groups.items()):
    knn = [r["knn_top1"] for r in runs]
    out.append({"side": side, "steps": steps, "settings": json.loads(settings), "runs": len(runs),
                "seeds": sorted(r["seed"] for r in runs), "knn_top1": knn,
                "knn_top1_mean": statistics.fmean(knn),
                "pairs_per_s_mean": statistics.fmean(r["pairs_per_s"] for r in runs)})
    after = [r["pairs_per_s_after_first_step"] for r in runs
             if r.get("pairs_per_s_after_first_step")]
    if after:  # the one convention both sides share (older peer lines lack it)
      out[-1]["pairs_per_s_after_first_step_mean"] = statistics.fmean(after)
  return out


def steps_list(text):
  """[150, 300] of "150,300"; argparse turns the ValueError into a usage error naming the flag."""
  return sorted({int(s) for s in text.split(",") if s.strip()})


def parser():
  ap = run_settings.Parser(PRESET, RUN_FLAGS, overrides=OVERRIDES,
                           description=__doc__.splitlines()[0])
  ap.add_argument("--side", choices=["ours", "peer", "both"], default="both")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--source", default=DEFAULT_SOURCE, help="class sub-folders to carve from")
  ap.add_argument("--split_dir", default="/tmp/nnclr_parity/split")
  ap.add_argument("--val_images", type=int, default=5000)
  ap.add_argument("--split_seed", type=int, default=0)
  ap.add_argument("--work_dir", default="/tmp/nnclr_parity", help="our model_dirs go here")
  ap.add_argument("--results", default=os.path.join(HERE, "parity_results.jsonl"))
  ap.add_argument("--override", action="append", default=[], metavar="FLAG=VALUE",
                  help="another flag for our side (smoke tests: a tiny model)")
  ap.add_argument("--peer_python", default="/work/peerenv/bin/python")
  ap.add_argument("--peer_dir", default=DEFAULT_PEER_DIR)
  ap.add_argument("--peer_flags", default="--malloc_tune",
                  help="extra flags for knn_budget.py (default: its best setting)")
  ap.add_argument("--eval_at", type=steps_list, default=[],
                  help="comma-separated steps before --steps at which kNN is also scored "
                       "(a learning curve; the schedule still runs over --steps)")
  ap.add_argument("--timeout", type=float, default=4 * 3600)
  ap.add_argument("--summary", action="store_true", help="only print the summary of --results")
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  # The peer runs the same seed and batch as ours; the rest of our side is the Experiment's.
  args.seed, args.batch_size, args.ours_flags = exp.train.seed, exp.train.batch_size, ap.given
  if args.summary:
    print(json.dumps({"benchmark": "parity_summary", "groups": summarise(args.results)}))
    return
  sides = ["peer", "ours"] if args.side == "both" else [args.side]
  if "peer" in sides:
    if any(n in ap.given for n in ABLATIONS):
      ap.error("--use_nn/--symmetric_loss/--weight_decay_mode change our side only; run the "
               "ablations with --side=ours")
    if not os.path.isfile(os.path.join(args.peer_dir, "knn_budget.py")):
      ap.error(f"--peer_dir={args.peer_dir} holds no knn_budget.py")
    if not os.path.isfile(args.peer_python):
      ap.error(f"--peer_python={args.peer_python} does not exist; set up the peer as in "
               f"{os.path.join(args.peer_dir, 'README.md')}")
  split = carve_split(args.source, args.split_dir, args.val_images, args.split_seed)
  os.makedirs(args.work_dir, exist_ok=True)
  for side in sides:
    load = os.getloadavg()[0]
    r = (run_peer if side == "peer" else run_ours)(args, args.split_dir)
    line = {"benchmark": "parity", "side": side, "seed": args.seed, "steps": args.steps,
            "batch_size": args.batch_size, **r, "split": {k: split[k] for k in
                                                          ("source", "val_images", "seed")},
            "load_average_1min_at_start": load, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(line), flush=True)
    with open(args.results, "a") as f:
      f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
  main()
