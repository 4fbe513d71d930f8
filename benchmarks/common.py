"""Shared by the benchmark scripts: building the real model, timing model.fit steps, FLOPs.

Their run settings are an Experiment (run_settings.Parser); `nnclr_tf.experiment.setup(exp)` makes
the strategy. Import this before TensorFlow is imported elsewhere: setup must split the CPU into
logical devices before TF initialises them.
"""

from __future__ import annotations

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

import keras  # noqa: E402  (importing does not initialise devices; experiment.setup still can)

# Every step benchmark deliberately differs from its preset here: the timed steps run at the
# recipe's peak learning rate, as the bulk of a run does, not at the first steps of its warm-up.
# The rate changes no arithmetic of the step, only the size of the updates (and so the losses).
STEP_OVERRIDES = {"warmup_epochs": 0}


def build_model(exp, strategy, steps_per_epoch):
  """The real NNCLR of `exp` (experiment.build_model), compiled with the real optimizer of
  exp.optim (training.build_optimizer). The benchmark's whole run is one epoch of
  `steps_per_epoch` steps (the unit of a --warmup_epochs given on its command line); the cosine
  spans 10**6 steps, so it stays flat over any benchmark."""
  from nnclr_tf import experiment, training
  model = experiment.build_model(exp, strategy)
  with strategy.scope():
    opt = training.build_optimizer(exp.optim, model.trainable_variables, exp.train.batch_size,
                                   10 ** 6, steps_per_epoch)
    model.compile(optimizer=opt,
                  jit_compile=training.keras_jit_compile(exp.train.jit_compile, strategy))
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
