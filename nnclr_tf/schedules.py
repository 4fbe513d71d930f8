"""Learning-rate scaling and the warm-up + cosine schedule (Goyal et al. 2017; SimCLR; NNCLR)."""

from __future__ import annotations

import math

import keras
from keras import ops


def scaled_learning_rate(base_lr, global_batch, scaling="linear"):
  """linear: base * B/256 (NNCLR: 0.3 x 4096/256 = 4.8); sqrt: base * sqrt(B/256); none: base."""
  if scaling == "linear":
    return base_lr * global_batch / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(global_batch / 256.0)
  if scaling == "none":
    return base_lr
  raise ValueError(f"unknown lr_scaling {scaling!r}; choose linear, sqrt or none")


@keras.saving.register_keras_serializable(package="nnclr_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`.

  lr(s) = peak * s / warmup                                  for s < warmup
        = peak * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))   after, 0 past total.
  """

  def __init__(self, peak, warmup_steps, total_steps):
    self.peak = float(peak)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = int(max(total_steps, 1))

  def __call__(self, step):
    s = ops.cast(step, "float32")
    warm = float(max(self.warmup_steps, 1))
    decay_len = float(max(self.total_steps - self.warmup_steps, 1))
    progress = ops.clip((s - self.warmup_steps) / decay_len, 0.0, 1.0)
    cosine = self.peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
    return ops.where(s < self.warmup_steps, self.peak * s / warm, cosine)

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
