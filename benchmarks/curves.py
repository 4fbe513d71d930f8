"""The learning-curve benchmark's report: kNN top-1 against the step for every run of --results
that has a curve (parity.py lines written with --eval_at), as a Markdown table and one plot
(--plot: kNN vs step, a line per run; ours's NN label-hit on a second axis).

The runs (each alone on an idle machine; 600 steps of 128, the 45,000 / 5,000 split):

  python benchmarks/parity.py --side=peer --steps=600 --eval_at=150,300 \\
      --peer_flags="--malloc_tune --skip_baseline" --results=benchmarks/curves.jsonl
  python benchmarks/parity.py --side=ours --steps=600 --eval_at=150,300 \\
      --results=benchmarks/curves.jsonl
  python benchmarks/parity.py --side=ours --use_nn=false --steps=600 --eval_at=150,300 \\
      --results=benchmarks/curves.jsonl
  python benchmarks/curves.py

One JSON line (`curves_report`: the runs with their points) is printed after the table.
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET_QUEUE = 4096  # flags/cifar10_resnet18_lightly.cfg's support set


def run_name(line):
  """"lightly NNCLR", "ours NNCLR", "ours SimCLR" (+ what else differs from the preset)."""
  if line["side"] == "peer":
    return "lightly NNCLR"
  s = line.get("settings", {})
  name = "ours NNCLR" if s.get("use_nn", True) else "ours SimCLR"
  if s.get("queue_size", PRESET_QUEUE) != PRESET_QUEUE:
    name += f", support set {s['queue_size']}"
  return name


def read_runs(path):
  runs = []
  with open(path) as f:
    for text in f:
      if text.strip():
        line = json.loads(text)
        if line.get("knn_curve"):
          runs.append({"name": run_name(line), "seed": line.get("seed"), "steps": line["steps"],
                       "curve": line["knn_curve"],
                       "pairs_per_s": line.get("pairs_per_s_after_first_step")
                       or line.get("pairs_per_s"),
                       "minutes": line.get("seconds", 0) / 60,
                       "knn_monitor_seconds": line.get("knn_monitor_seconds"),
                       "date": line.get("date")})
  return runs


def table(runs):
  steps = sorted({p["step"] for r in runs for p in r["curve"]})
  head = (["run", "seed"] + [f"kNN @ {s}" for s in steps] + [f"NN hit @ {s}" for s in steps]
          + ["pairs/s", "wall min"])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in runs:
    at = {p["step"]: p for p in r["curve"]}
    knn = [f"{at[s]['knn_top1']:.4f}" if s in at else "" for s in steps]
    hit = [f"{at[s]['nn_label_hit']:.3f}" if s in at and at[s].get("nn_label_hit") is not None
           else "" for s in steps]
    rate = f"{r['pairs_per_s']:.1f}" if r["pairs_per_s"] else ""
    rows.append("| " + " | ".join([r["name"], str(r["seed"]), *knn, *hit, rate,
                                   f"{r['minutes']:.0f}"]) + " |")
  return "\n".join(rows)


def plot(runs, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  hit_ax = None
  for r in runs:
    steps = [p["step"] for p in r["curve"]]
    line, = ax.plot(steps, [p["knn_top1"] for p in r["curve"]], marker="o",
                    label=f"{r['name']} (seed {r['seed']})")
    hits = [(p["step"], p["nn_label_hit"]) for p in r["curve"] if p.get("nn_label_hit")]
    if hits and "SimCLR" not in r["name"]:
      hit_ax = hit_ax or ax.twinx()
      hit_ax.plot(*zip(*hits), linestyle="--", marker="x", color=line.get_color(), alpha=0.6,
                  label=f"{r['name']}: NN label-hit")
  ax.set_xlabel("step (batch 128)")
  ax.set_ylabel("weighted kNN top-1 (k=200, T=0.1), 5,000 held-out images")
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if hit_ax is not None:
    hit_ax.set_ylabel("NN label-hit (dashed)")
    more = hit_ax.get_legend_handles_labels()
    handles, labels = handles + more[0], labels + more[1]
  ax.legend(handles, labels, fontsize=8, loc="lower right")
  ax.set_title("CIFAR-10, ResNet-18, lightly's recipe: kNN while pretraining")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default=os.path.join(HERE, "curves.jsonl"))
  ap.add_argument("--plot", default=os.path.join(HERE, "curves.png"),
                  help="where the plot goes ('' for none)")
  args = ap.parse_args(argv)
  runs = read_runs(args.results)
  if not runs:
    raise SystemExit(f"error: {args.results} holds no run with a knn_curve; run "
                     "benchmarks/parity.py with --eval_at first")
  print(table(runs))
  if args.plot:
    plot(runs, args.plot)
  print(json.dumps({"benchmark": "curves_report", "runs": runs,
                    "plot": args.plot or None}))


if __name__ == "__main__":
  main()
