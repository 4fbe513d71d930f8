"""What the support set costs: train-step time with the NN lookup (use_nn=true) over the same
step without it (use_nn=false, the positive is the other view), at several queue sizes.

All models live in one process and are timed in alternating rounds (no_nn, nn@Q1, nn@Q2, ...,
then again), so a change in machine load during the run hits every configuration alike. The
models are flags/cifar10_resnet18.cfg's (--preset), each setting changed by its nnclr_tf flag.

  python benchmarks/nn_overhead.py --batch_size=256 --steps=3 --rounds=2
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak  # noqa: E402

import common  # noqa: E402  (sets the TF environment before TensorFlow is imported)
import run_settings  # noqa: E402
from nnclr_tf.errors import ConfigError  # noqa: E402

# The CIFAR-10 ResNet-18 recipe, as throughput.py: the model the NN-overhead target is set on.
PRESET = "cifar10_resnet18"


def queue_sizes(args):
  return [int(q) for q in args.queue_sizes.split(",")]


def overrides(args, given):
  # Each model's support set is one of --queue_sizes (the sweep), never the preset's, so the
  # batch is checked against those sizes.
  return {**common.STEP_OVERRIDES, "queue_size": queue_sizes(args)[0]}


def parser():
  ap = run_settings.Parser(
      PRESET, [f for f in run_settings.STEP_FLAGS if f not in ("queue_size", "use_nn")],
      overrides=overrides, description=__doc__.splitlines()[0])
  ap.add_argument("--queue_sizes", default="8192,65536,98304,131072")
  ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of --steps each")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  queues, batch = queue_sizes(args), exp.train.batch_size
  configs = [("no_nn", queues[0], False)] + [(f"nn_{q}", q, True) for q in queues]
  # use_nn=false never reads the queue; its size only sets memory, so the smallest is used.
  try:
    exps = {name: exp.replace(queue_size=q, use_nn=use_nn) for name, q, use_nn in configs}
  except ConfigError as e:
    ap.error(str(e))

  load_before = peak.load_average()
  from nnclr_tf import experiment
  strategy = experiment.setup(exp)
  import tensorflow as tf
  ds = common.in_memory_dataset(strategy, batch, exp.data.image_size, exp.train.seed)
  models = {}
  for name, e in exps.items():
    models[name] = common.build_model(e, strategy, args.warmup + args.steps + 1)
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
        "pairs_per_sec": batch / step,
        "ratio_to_no_nn": step / base,
        "cpu_ratio_to_no_nn": common.median(cpu[name]) / base_cpu,
        "step_ms_all": [round(1000 * t, 1) for t in times[name]],
        "flops": common.step_flops(models[name], batch, use_nn),
    }
  print(json.dumps({
      "benchmark": "nn_overhead", "results": results,
      "ratio_at": {str(q): results[f"nn_{q}"]["ratio_to_no_nn"] for q in queues},
      "peak_rss_mb": common.peak_rss_mb(),
      "device": {**peak.machine(), "replicas": strategy.num_replicas_in_sync},
      "tf_version": tf.__version__, "settings": ap.settings(args, exp), "env": common.environment(),
      "load_average_before": load_before, "load_average_after": peak.load_average(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
