"""Step time of the NNCLR train step for 1, 2 and 4 logical CPU replicas, with and without XLA.

  python benchmarks/scaling.py                  # prints one JSON line
  python benchmarks/scaling.py --steps=40 --backbone=small_cnn --width=32

Each configuration runs in its own subprocess (the logical-CPU split is fixed when TF starts, and
TF's collective keys are per process). A run is model.fit through nnclr_tf.training.pretrain on
the bundled digits with the quickstart model by default; the figure is the median wall time of
the steps after `--warmup` (which include tracing and, with XLA, compilation), in wall time and in
CPU time of the whole process (all TF threads; less sensitive to other jobs on a shared machine).

Logical CPU replicas share the same cores, so on CPU more replicas cannot be faster: the figures
measure the cost of the replication machinery (per-replica graphs, all-gathers, synchronised BN,
gradient all-reduce), not a speed-up. XLA with several Mirrored replicas is not run: Keras 3
compiles strategy.run as one XLA program that cannot span devices (training.keras_jit_compile
refuses it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(1, False), (1, True), (2, False), (4, False)]


def flags():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backbone", default="small_cnn",
                  choices=["small_cnn", "resnet18_cifar", "resnet50"])
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=16)
  ap.add_argument("--batch_size", type=int, default=128, help="global batch")
  ap.add_argument("--queue_size", type=int, default=1024)
  ap.add_argument("--proj_hidden_dim", type=int, default=512)
  ap.add_argument("--pred_hidden_dim", type=int, default=512)
  ap.add_argument("--embedding_dim", type=int, default=64)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # "replicas,xla"
  return ap.parse_args()


def child(args):
  replicas, xla = (int(v) for v in args.child.split(","))
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, REPO)
  from nnclr_tf import distributed
  distributed.split_cpu(replicas)
  import keras
  import tensorflow as tf

  from nnclr_tf import data, experiment, training
  from nnclr_tf.config import Experiment

  class StepTimes(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.times, self.cpu = [], []

    def on_train_batch_begin(self, batch, logs=None):
      self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
      self.times.append(time.perf_counter() - self._t)
      self.cpu.append(time.process_time() - self._c)

  tf.get_logger().setLevel("ERROR")
  strategy = distributed.make_strategy("auto", replicas)
  timer = StepTimes()
  with tempfile.TemporaryDirectory() as d:
    exp = Experiment.from_flags(dict(
        dataset="digits", backbone=args.backbone, image_size=args.image_size, width=args.width,
        proj_hidden_dim=args.proj_hidden_dim, proj_layers=2,
        pred_hidden_dim=args.pred_hidden_dim, embedding_dim=args.embedding_dim,
        queue_size=args.queue_size, temperature=0.1, seed=0, model_dir=d,
        batch_size=args.batch_size, train_steps=args.warmup + args.steps, jit_compile=bool(xla),
        verbose=0, optimizer="lars", learning_rate=0.3, warmup_epochs=0, flip_prob=0,
        jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0), solarize_prob=(0, 0),
        crop_min_scale=0.4))
    model = experiment.build_model(exp, strategy)
    train, _ = data.load_sources(exp.data)
    training.pretrain(model, strategy, train, exp.data, exp.augment, exp.train, exp.optim,
                      callbacks=[timer])
  timed = timer.times[args.warmup:]
  print(json.dumps({"median_step_ms": 1000 * statistics.median(timed),
                    "median_step_cpu_ms": 1000 * statistics.median(timer.cpu[args.warmup:]),
                    "replicas": strategy.num_replicas_in_sync, "timed_steps": len(timed)}))


def main():
  args = flags()
  if args.child:
    return child(args)
  passthrough = [a for a in sys.argv[1:] if not a.startswith("--child")]
  out = {"benchmark": "scaling", "median_step_ms": {}, "median_step_cpu_ms": {}}
  for replicas, xla in CONFIGS:
    key = f"replicas_{replicas}" + ("_xla" if xla else "")
    try:
      p = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                          f"--child={replicas},{int(xla)}"], capture_output=True, text=True,
                         timeout=args.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
      out["median_step_ms"][key] = out["median_step_cpu_ms"][key] = None
      out.setdefault("failed", {})[key] = f"timed out after {args.timeout} s"
      continue
    if p.returncode:
      out["median_step_ms"][key] = out["median_step_cpu_ms"][key] = None
      out.setdefault("failed", {})[key] = p.stderr.strip().splitlines()[-1][-300:]
      continue
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("median_step_ms", "median_step_cpu_ms"):
      out[name][key] = round(figures[name], 1)
  ms = out["median_step_ms"]
  out.update(
      pairs_per_sec={k: v and round(args.batch_size / (v / 1000), 1) for k, v in ms.items()},
      xla_speedup_1_replica=(ms["replicas_1"] and ms["replicas_1_xla"] and
                             round(ms["replicas_1"] / ms["replicas_1_xla"], 2)),
      xla_with_several_mirrored_replicas="refused (Keras compiles strategy.run as one program)",
      model=dict(backbone=args.backbone, width=args.width, image_size=args.image_size,
                 global_batch=args.batch_size, queue_size=args.queue_size,
                 proj_hidden_dim=args.proj_hidden_dim, pred_hidden_dim=args.pred_hidden_dim,
                 embedding_dim=args.embedding_dim),
      warmup_steps=args.warmup, timed_steps=args.steps,
      machine=f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
      date=datetime.date.today().isoformat(),
      load_average_at_end=[round(x, 2) for x in os.getloadavg()])
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  main()
