"""What the support set costs: train-step time with the NN lookup (use_nn=true) over the same
step without it (use_nn=false, the positive is the other view), at several queue sizes.

All models live in one process and are timed in alternating rounds (no_nn, nn@Q1, nn@Q2, ...,
then again), so a change in machine load during the run hits every configuration alike.

  python benchmarks/nn_overhead.py --batch_size=256 --steps=3 --rounds=2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak  # noqa: E402

import common  # noqa: E402  (sets the TF environment before TensorFlow is imported)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_flags(ap)
  ap.add_argument("--queue_sizes", default="8192,65536,98304,131072")
  ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of --steps each")
  ap.set_defaults(steps=3, warmup=1)
  args = ap.parse_args(argv)
  queues = [int(q) for q in args.queue_sizes.split(",")]
  bad = [q for q in queues if q % args.batch_size]
  if bad:
    ap.error(f"queue sizes {bad} are not multiples of --batch_size={args.batch_size}")

  load_before = peak.load_average()
  strategy = common.setup(args.cpu_replicas, args.mixed_precision)
  import tensorflow as tf
  ds = common.in_memory_dataset(strategy, args.batch_size, args.image_size, args.seed)
  # use_nn=false never reads the queue; its size only sets memory, so the smallest is used.
  configs = [("no_nn", queues[0], False)] + [(f"nn_{q}", q, True) for q in queues]
  models = {}
  for name, q, use_nn in configs:
    models[name] = common.build_model(args, strategy, q, use_nn)
    common.fit_steps(models[name], ds, args.warmup)
  times = {name: [] for name in models}
  cpu = {name: [] for name in models}
  for _ in range(args.rounds):
    for name, model in models.items():
      timer = common.fit_steps(model, ds, args.steps)
      times[name] += timer.times
      cpu[name] += timer.cpu_times
  base = common.median(times["no_nn"])
  base_cpu = common.median(cpu["no_nn"])
  results = {}
  for name, q, use_nn in configs:
    step = common.median(times[name])
    results[name] = {
        "queue_size": q, "use_nn": use_nn, "step_ms": 1000 * step,
        "step_cpu_ms": 1000 * common.median(cpu[name]),
        "pairs_per_sec": args.batch_size / step,
        "ratio_to_no_nn": step / base,
        "cpu_ratio_to_no_nn": common.median(cpu[name]) / base_cpu,
        "step_ms_all": [round(1000 * t, 1) for t in times[name]],
        "flops": common.step_flops(models[name], args.batch_size, use_nn),
    }
  print(json.dumps({
      "benchmark": "nn_overhead", "results": results,
      "ratio_at": {str(q): results[f"nn_{q}"]["ratio_to_no_nn"] for q in queues},
      "peak_rss_mb": common.peak_rss_mb(),
      "device": {**peak.machine(), "replicas": strategy.num_replicas_in_sync},
      "tf_version": tf.__version__, "settings": vars(args), "env": common.environment(),
      "load_average_before": load_before, "load_average_after": peak.load_average(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
