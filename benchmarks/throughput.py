"""Throughput of the real NNCLR train step (NNCLR.train_step through model.fit), no input pipeline.

The views are fixed in-memory tensors, so the figure is the step alone: forward of both views,
support-set lookup and enqueue, loss, backward and the optimizer update. Untimed warm-up steps
absorb tracing; the median of the timed steps is reported, with the step's achieved GFLOP/s
(analytic FLOPs, see common.step_flops) as a fraction of the dense matmul peak of the same cores
(peak.py, measured right after the steps unless --peak_gflops is given).

The model, batch, support set, optimizer and runtime are flags/cifar10_resnet18.cfg's (--preset),
each changed by its nnclr_tf flag (--help lists them):

  python benchmarks/throughput.py --backbone=resnet18_cifar --image_size=32 --batch_size=256 \
      --queue_size=65536 --steps=10
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

# The CIFAR-10 ResNet-18 recipe: the model the step targets and RESULTS.md's figures are set on.
PRESET = "cifar10_resnet18"
# The matmul the step's compute dtype is compared with.
PEAK_DTYPES = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parser():
  ap = run_settings.Parser(PRESET, run_settings.STEP_FLAGS, overrides=common.STEP_OVERRIDES,
                           description=__doc__.splitlines()[0])
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps (tracing, first touch)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--peak_gflops", type=float, default=0.0,
                  help="matmul peak to compare with; 0 measures it (peak.py) after the steps")
  ap.add_argument("--peak_sizes", default="1024,2048")
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  batch = exp.train.batch_size

  load_before = peak.load_average()
  from nnclr_tf import experiment
  strategy = experiment.setup(exp)
  import tensorflow as tf
  model = common.build_model(exp, strategy, args.warmup + args.steps + 1)
  ds = common.in_memory_dataset(strategy, batch, exp.data.image_size, exp.train.seed)
  t0 = time.perf_counter()
  common.fit_steps(model, ds, args.warmup)
  warmup_s = time.perf_counter() - t0
  timer = common.fit_steps(model, ds, args.steps)
  times, losses = timer.times, timer.losses
  load_after = peak.load_average()

  step_s = common.median(times)
  flops = common.step_flops(model, batch, exp.support.use_nn)
  achieved = flops["step_gflop"] / step_s
  dtype = PEAK_DTYPES[exp.runtime.mixed_precision]
  if args.peak_gflops:
    peak_gflops, peak_cpu = args.peak_gflops, None
  else:
    p = peak.measure(tuple(int(s) for s in args.peak_sizes.split(",")), (dtype,), seconds=0.5)
    peak_gflops, peak_cpu = p[dtype]["gflops"], p[dtype]["gflops_per_cpu_s"]
  achieved_cpu = flops["step_gflop"] / common.median(timer.cpu_times)
  out = {
      "benchmark": "throughput",
      "pairs_per_sec": batch / step_s,
      "step_ms": 1000 * step_s,
      "step_ms_min": 1000 * min(times),
      "step_ms_mean": 1000 * sum(times) / len(times),
      "step_ms_all": [round(1000 * t, 1) for t in times],
      "step_cpu_ms": 1000 * common.median(timer.cpu_times),
      "cpu_utilisation": common.median(timer.cpu_times) / step_s,
      "warmup_s": warmup_s,
      "loss_first": losses[0], "loss_last": losses[-1],
      "peak_rss_mb": common.peak_rss_mb(),
      "achieved_gflops": achieved,
      "peak_gflops": peak_gflops,
      "peak_dtype": dtype,
      "fraction_of_peak": achieved / peak_gflops,
      # The same ratio per CPU second of this process: meaningful under load, when other
      # processes stretch both wall times unevenly.
      "achieved_gflops_per_cpu_s": achieved_cpu,
      "peak_gflops_per_cpu_s": peak_cpu,
      "fraction_of_peak_cpu": achieved_cpu / peak_cpu if peak_cpu else None,
      "flops": flops,
      "device": {**peak.machine(),
                 "logical_devices": [d.name for d in tf.config.list_logical_devices()],
                 "replicas": strategy.num_replicas_in_sync},
      "tf_version": tf.__version__,
      "settings": ap.settings(args, exp),
      "env": common.environment(),
      "load_average_before": load_before, "load_average_after": load_after,
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
