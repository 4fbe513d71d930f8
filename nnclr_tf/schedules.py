"""Learning-rate scaling and the warm-up + cosine schedule (Goyal et al. 2017; SimCLR; NNCLR)."""

from __future__ import annotations

import math

import keras


def scaled_learning_rate(base_lr, global_batch, scaling="linear"):
  """linear: base * B/256 (NNCLR: 0.3 x 4096/256 = 4.8); sqrt: base * sqrt(B/256); none: base."""
  if scaling == "linear":
    return base_lr * global_batch / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(global_batch / 256.0)
  if scaling == "none":
    return base_lr
  raise ValueError(f"unknown lr_scaling {scaling!r}; choose linear, sqrt or none")


def WarmupCosine(peak, warmup_steps, total_steps):  # noqa: N802  (reads as the schedule it makes)
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`:

  lr(s) = peak * s / warmup                                  for s < warmup
        = peak * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))   after, 0 past total.

  Keras's own CosineDecay with its warm-up arguments (equal to the formula above to 1.5e-8,
  tests/test_schedules.py), so saved optimizers need no nnclr_tf class to load.
  """
  total = int(max(total_steps, 1))
  warmup = int(min(max(warmup_steps, 0), total))
  if warmup == 0:
    return keras.optimizers.schedules.CosineDecay(float(peak), decay_steps=total, alpha=0.0)
  return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(total - warmup, 1),
                                                alpha=0.0, warmup_target=float(peak),
                                                warmup_steps=warmup)
