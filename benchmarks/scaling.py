"""Step time of the NNCLR train step for 1, 2 and 4 logical CPU replicas, with and without XLA.

  python benchmarks/scaling.py                  # prints one JSON line
  python benchmarks/scaling.py --steps=40 --backbone=small_cnn --width=32

Each configuration runs in its own subprocess (the logical-CPU split is fixed when TF starts, and
TF's collective keys are per process). A run is model.fit through nnclr_tf.training.pretrain of
flags/quickstart.cfg's model on its bundled digits (--preset; each setting changed by its nnclr_tf
flag, --help lists them); the figure is the median wall time of the steps after `--warmup` (which
include tracing and, with XLA, compilation), in wall time and in CPU time of the whole process
(all TF threads; less sensitive to other jobs on a shared machine).

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

import run_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(1, False), (1, True), (2, False), (4, False)]
# The quickstart model on the bundled digits: small enough for 1-4 replicas on two cores.
PRESET = "quickstart"
# The replicas and XLA are what each configuration sets; the rest of the run is the preset's,
# changed by flag name.
SWEPT = ("cpu_replicas", "jit_compile", "strategy", "tpu")


def overrides(args, given):
  return {
      # Train on every bundled image: nothing is evaluated here, so none is held out.
      "val_images": 0,
      # The timed steps run at the peak learning rate, as the bulk of a run does, not inside the
      # preset's 2-epoch warm-up.
      "warmup_epochs": 0,
      "train_steps": args.warmup + args.steps,  # the run is the benchmark's steps
      "verbose": 0,  # Keras's progress lines would only fill the child's captured stdout
  }


def parser():
  ap = run_settings.Parser(
      PRESET, run_settings.flag_names(
          ("data", "augment", "model", "support", "loss", "optim", "runtime"),
          ("batch_size", "seed"), exclude=SWEPT),
      overrides=overrides, description=__doc__.splitlines()[0])
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # "replicas,xla"
  return ap


def child(args, exp):
  replicas, xla = (int(v) for v in args.child.split(","))
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import keras
  import tensorflow as tf

  from nnclr_tf import experiment, training

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
  timer = StepTimes()
  with tempfile.TemporaryDirectory() as d:
    exp = exp.replace(cpu_replicas=replicas, jit_compile=bool(xla), model_dir=d)
    strategy = experiment.setup(exp)
    model = experiment.build_model(exp, strategy)
    train, _ = experiment.load_data(exp)
    training.pretrain(model, strategy, train, exp.data, exp.augment, exp.train, exp.optim,
                      callbacks=[timer])
  timed = timer.times[args.warmup:]
  print(json.dumps({"median_step_ms": 1000 * statistics.median(timed),
                    "median_step_cpu_ms": 1000 * statistics.median(timer.cpu[args.warmup:]),
                    "replicas": strategy.num_replicas_in_sync, "timed_steps": len(timed)}))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args, exp = parser().parse(argv)
  if args.child:
    return child(args, exp)
  passthrough = [a for a in argv if not a.startswith("--child")]
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
  ms, m = out["median_step_ms"], exp.model
  batch = exp.train.batch_size
  out.update(
      pairs_per_sec={k: v and round(batch / (v / 1000), 1) for k, v in ms.items()},
      xla_speedup_1_replica=(ms["replicas_1"] and ms["replicas_1_xla"] and
                             round(ms["replicas_1"] / ms["replicas_1_xla"], 2)),
      xla_with_several_mirrored_replicas="refused (Keras compiles strategy.run as one program)",
      model=dict(backbone=m.backbone, width=m.width, image_size=exp.data.image_size,
                 global_batch=batch, queue_size=exp.support.queue_size,
                 proj_hidden_dim=m.proj_hidden_dim, pred_hidden_dim=m.pred_hidden_dim,
                 embedding_dim=m.embedding_dim),
      warmup_steps=args.warmup, timed_steps=args.steps,
      machine=f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
      date=datetime.date.today().isoformat(),
      load_average_at_end=[round(x, 2) for x in os.getloadavg()])
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  main()
