"""Shared by the benchmark scripts: building the real model, timing model.fit steps, FLOPs.

Import this before TensorFlow is imported elsewhere: `setup(cpu_replicas)` must split the CPU
into logical devices before TF initialises them.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As run.py: TF's oneDNN kernels are off by default on CPUs without AVX512-VNNI/BF16/AMX (this
# one), and the default Eigen convolutions are much slower (benchmarks/RESULTS.md).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import keras  # noqa: E402  (importing does not initialise devices; split_cpu still works)

# The CIFAR-10 ResNet-18 recipe (flags/cifar10_resnet18.cfg): the model the targets are set on.
RECIPE = dict(backbone="resnet18_cifar", width=64, proj_hidden_dim=2048, proj_layers=3,
              pred_hidden_dim=4096, embedding_dim=256, temperature=0.2)


def str2bool(v):
  if isinstance(v, bool):
    return v
  if v.lower() in ("1", "true", "yes", "y"):
    return True
  if v.lower() in ("0", "false", "no", "n"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_model_flags(ap):
  """The flags that choose the model and how its step runs (shared by the step benchmarks)."""
  ap.add_argument("--backbone", default=RECIPE["backbone"],
                  choices=["resnet18_cifar", "resnet50", "small_cnn"])
  ap.add_argument("--width", type=int, default=RECIPE["width"])
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--batch_size", type=int, default=256, help="global batch (pairs per step)")
  ap.add_argument("--proj_hidden_dim", type=int, default=RECIPE["proj_hidden_dim"])
  ap.add_argument("--proj_layers", type=int, default=RECIPE["proj_layers"])
  ap.add_argument("--pred_hidden_dim", type=int, default=RECIPE["pred_hidden_dim"])
  ap.add_argument("--embedding_dim", type=int, default=RECIPE["embedding_dim"])
  ap.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
  ap.add_argument("--jit_compile", type=str2bool, default=False)
  ap.add_argument("--mixed_precision", default="none", choices=["none", "bf16"])
  ap.add_argument("--cpu_replicas", type=int, default=1)
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps (tracing, first touch)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--seed", type=int, default=0)


def setup(cpu_replicas=1, mixed_precision="none"):
  """Splits the CPU, sets the precision policy, returns the strategy (call once, first)."""
  from nnclr_tf import distributed
  distributed.split_cpu(cpu_replicas)
  if mixed_precision == "bf16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  return distributed.make_strategy("auto", cpu_replicas)


def experiment_of(args, queue_size, use_nn):
  """The nnclr_tf Experiment of the benchmark's model flags (the CLI's flag names)."""
  from nnclr_tf.config import Experiment
  return Experiment.from_flags(dict(
      backbone=args.backbone, image_size=args.image_size, width=args.width,
      proj_hidden_dim=args.proj_hidden_dim, proj_layers=args.proj_layers,
      pred_hidden_dim=args.pred_hidden_dim, embedding_dim=args.embedding_dim,
      queue_size=queue_size, use_nn=use_nn, temperature=RECIPE["temperature"], seed=args.seed,
      batch_size=args.batch_size, optimizer=args.optimizer, warmup_epochs=0,
      jit_compile=args.jit_compile))


def build_model(args, strategy, queue_size, use_nn):
  """The real NNCLR (experiment.build_model), compiled with the real optimizer
  (nnclr_tf.training.build_optimizer)."""
  from nnclr_tf import experiment, training
  exp = experiment_of(args, queue_size, use_nn)
  model = experiment.build_model(exp, strategy)
  with strategy.scope():
    total = args.warmup + args.steps + 1
    opt = training.build_optimizer(exp.optim, model.trainable_variables, args.batch_size,
                                   10 ** 6, total)
    model.compile(optimizer=opt, jit_compile=args.jit_compile)
    opt.build(model.trainable_variables)
  return model


def in_memory_dataset(strategy, batch_size, image_size, seed=0, distinct=2):
  """`distinct` fixed global batches of random views held as tensors, repeated: no decode and
  no augmentation, so the timing is the step alone. Labels look real (10 classes)."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  shape = (distinct, batch_size, image_size, image_size, 3)
  batches = {"view1": rng.uniform(size=shape).astype(np.float32),
             "view2": rng.uniform(size=shape).astype(np.float32),
             "label": rng.integers(0, 10, size=shape[:2]).astype(np.int32)}
  ds = tf.data.Dataset.from_tensor_slices(batches).repeat().prefetch(2)
  if strategy.num_replicas_in_sync == 1:
    return ds
  return strategy.experimental_distribute_dataset(ds)  # splits each global batch by rows


class StepTimer(keras.callbacks.Callback):
  """Each step's wall time and process CPU time (all threads, user + system). The loss is read at
  the end of every step, which waits for the step to finish. On a shared machine the CPU time
  per step is the steadier figure: other processes stretch wall time far more than CPU time."""

  def __init__(self):
    super().__init__()
    self.times, self.cpu_times, self.losses = [], [], []
    self._t = self._c = None

  def on_train_batch_begin(self, batch, logs=None):
    self._t, self._c = time.perf_counter(), time.process_time()

  def on_train_batch_end(self, batch, logs=None):
    loss = float(logs["loss"])
    self.times.append(time.perf_counter() - self._t)
    self.cpu_times.append(time.process_time() - self._c)
    self.losses.append(loss)


def fit_steps(model, ds, steps):
  """Runs `steps` steps of model.fit; returns the StepTimer (times, cpu_times, losses)."""
  timer = StepTimer()
  model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
  return timer


def conv_dense_flops(keras_model):
  """Forward FLOPs per example (2 x multiply-adds) of the Conv2D and Dense layers of a
  functional keras.Model, and of the first layer that needs no input gradient."""
  total, first = 0, None
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      kh, kw, cin, cout = layer.kernel.shape
      _, h, w, _ = layer.output.shape
      f = 2 * h * w * kh * kw * cin * cout
    elif isinstance(layer, keras.layers.Dense):
      cin, cout = layer.kernel.shape
      f = 2 * cin * cout
    else:
      continue
    if first is None:
      first = f
    total += f
  return total, first or 0


def step_flops(model, global_batch, use_nn):
  """Analytic FLOPs of one train step (all replicas), multiply-adds x 2:

  backbone + heads: forward F on 2B images, backward 2F (input and weight gradients) except the
  stem conv, whose input gradient is not needed (1F); NN lookup: one [B, d] x [d, Q] matmul per
  view, forward only (the neighbour is a constant); loss: one [B, d] x [d, B] matmul per view,
  forward + gradient w.r.t. p only. BatchNorm, ReLU, optimizer and normalisation are not counted
  (memory-bound, no matmul)."""
  images = 2 * global_batch
  enc, stem = conv_dense_flops(model.encoder)
  proj, _ = conv_dense_flops(model.projector)
  pred, _ = conv_dense_flops(model.predictor)
  net_fwd = enc + proj + pred
  net = images * (3 * net_fwd - stem)
  d = model.support_set.dim
  nn = 2 * 2 * global_batch * model.support_set.size * d if use_nn else 0
  loss = 2 * 2 * (2 * global_batch * global_batch * d)
  return {"backbone_forward_gflop_per_image": enc / 1e9,
          "heads_forward_gflop_per_image": (proj + pred) / 1e9,
          "nn_lookup_gflop": nn / 1e9, "loss_gflop": loss / 1e9,
          "step_gflop": (net + nn + loss) / 1e9}


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def median(xs):
  return statistics.median(xs) if xs else float("nan")


def environment():
  """What decides CPU speed besides the code: allocator and oneDNN settings, load."""
  keys = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
          "MALLOC_ARENA_MAX", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")
  return {k: os.environ[k] for k in keys if k in os.environ}
