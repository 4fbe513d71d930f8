"""Our train step against the peer library's (lightly) on this machine, back to back, in rounds.

Each round runs the peer's benchmark script (`../shared/peers/lightly/throughput.py`, in its own
Python environment, as a subprocess: the peer is never imported) and then ours
(`benchmarks/throughput.py`), same backbone, image size, batch and support-set size. The figure is
the ratio of the medians over rounds of the two train-step pairs/s, as the Performance issue asks;
each round's ratio is printed as well, so the noise is visible.

  python benchmarks/peer_compare.py --peer_python=/tmp/peerenv/bin/python --rounds=2 --steps=10

Peer set-up (outside the project): see ../shared/peers/lightly/README.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import run_settings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "peers", "lightly"))
# throughput.py's preset: the recipe the peer's script runs too (R18-CIFAR, 32 px). Its batch and
# support-set size are the defaults of the two settings both sides are given.
PRESET = "cifar10_resnet18"


def last_json_line(text):
  """The last line of `text` that parses as a JSON object (the benchmark's result line)."""
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise ValueError("no JSON result line in the output")


def run(cmd, cwd, timeout):
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise SystemExit(f"error: {' '.join(cmd[:2])} exited {proc.returncode}:\n{tail}")
  return last_json_line(proc.stdout), time.perf_counter() - t0


def peer_pairs_per_sec(result):
  return float(result["train_step"]["pairs_per_s_median"])


def ratio_of_medians(ours, peers):
  """median(ours) / median(peer) over rounds (pairs/s: higher is faster)."""
  return statistics.median(ours) / statistics.median(peers)


def parser():
  # No --preset: the peer's side is its script's recipe whatever ours would be.
  ap = run_settings.Parser(PRESET, ("batch_size", "queue_size"), preset_option=False,
                           description=__doc__.splitlines()[0])
  ap.add_argument("--peer_python", default="/tmp/peerenv/bin/python",
                  help="Python of the peer's environment (torch, torchvision, lightly)")
  ap.add_argument("--peer_dir", default=DEFAULT_PEER_DIR)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
  ap.add_argument("--peer_flags", default="--malloc_tune --aug_images 512 --aug_workers=",
                  help="extra flags for the peer (default: its best setting, --malloc_tune; the "
                       "augmentation timing cut short, it is not compared here)")
  ap.add_argument("--ours_flags", default="", help="extra flags for benchmarks/throughput.py")
  ap.add_argument("--timeout", type=float, default=3600)
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  # Given to the peer's script and to ours alike.
  args.batch_size, args.queue_size = exp.train.batch_size, exp.support.queue_size
  peer_script = os.path.join(args.peer_dir, "throughput.py")
  if not os.path.isfile(peer_script):
    ap.error(f"--peer_dir={args.peer_dir} holds no throughput.py (the peer benchmark)")
  if not os.path.isfile(args.peer_python):
    ap.error(f"--peer_python={args.peer_python} does not exist; set up the peer as in "
             f"{os.path.join(args.peer_dir, 'README.md')}")

  peer_cmd = [args.peer_python, peer_script, "--batch_size", str(args.batch_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--bank_size", str(args.queue_size)] + args.peer_flags.split()
  ours_cmd = [sys.executable, os.path.join(HERE, "throughput.py"),
              f"--batch_size={args.batch_size}", f"--queue_size={args.queue_size}",
              f"--steps={args.steps}", f"--warmup={args.warmup}"] + args.ours_flags.split()
  rounds = []
  for r in range(args.rounds):
    load = os.getloadavg()[0]
    peer, peer_s = run(peer_cmd, args.peer_dir, args.timeout)
    ours, ours_s = run(ours_cmd, HERE, args.timeout)
    p, o = peer_pairs_per_sec(peer), float(ours["pairs_per_sec"])
    rounds.append({"round": r + 1, "load_average_1min_at_start": load,
                   "peer_pairs_per_sec": p, "ours_pairs_per_sec": o, "ratio": o / p,
                   "ours_step_ms": ours["step_ms"], "ours_step_cpu_ms": ours["step_cpu_ms"],
                   "ours_fraction_of_peak": ours["fraction_of_peak"],
                   "ours_loss_first_last": [ours["loss_first"], ours["loss_last"]],
                   "peer_run_s": round(peer_s, 1), "ours_run_s": round(ours_s, 1),
                   "peer_result": peer})
    print(json.dumps({"progress": rounds[-1]["round"], "ratio": rounds[-1]["ratio"],
                      "peer": p, "ours": o}), file=sys.stderr, flush=True)
  ours_all = [r["ours_pairs_per_sec"] for r in rounds]
  peer_all = [r["peer_pairs_per_sec"] for r in rounds]
  print(json.dumps({
      "benchmark": "peer_compare",
      "ratio_of_medians": ratio_of_medians(ours_all, peer_all),
      "ours_median_pairs_per_sec": statistics.median(ours_all),
      "peer_median_pairs_per_sec": statistics.median(peer_all),
      "round_ratios": [r["ratio"] for r in rounds],
      "rounds": rounds,
      "settings": vars(args), "peer_cmd": peer_cmd, "ours_cmd": ours_cmd,
      "load_average_at_end": list(os.getloadavg()),
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }))


if __name__ == "__main__":
  main()
