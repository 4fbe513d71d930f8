"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks").

Default mode, per variable w with gradient g, as used by SimCLR/BYOL/NNCLR:
  g <- g + weight_decay * w                          (weights only)
  trust = eta * ||w|| / ||g||  if both norms > 0 else 1   (weights only; biases/BN: trust = 1)
  v <- momentum * v + lr * trust * g
  w <- w - v

Clip mode (`clip_lr=True`, NVIDIA's LARC "clip" as used by solo-learn's CIFAR recipe), with the
momentum in PyTorch's convention (the schedule's lr multiplies the velocity, not the gradient):
  trust = eta * ||w|| / (||g|| + weight_decay * ||w||)   (raw g; 1 if either norm is 0)
  g' = (g + weight_decay * w) * min(trust / lr, 1)      (weights only; biases/BN: g' = g)
  v <- momentum * v + g'
  w <- w - lr * v
so each weight tensor moves at the local rate min(trust, lr): plain momentum SGD whenever the
schedule's lr is the smaller (e.g. early in the warm-up).

The two modes differ beyond the clip, on purpose:
- trust's denominator: ||g + wd*w|| (paper, SimCLR) vs ||g|| + wd*||w|| (LARC, solo-learn); they
  agree only when g and w are parallel.
- where lr enters: the default folds lr into the velocity, so a velocity built up at an earlier lr
  keeps that lr; clip mode rescales the whole velocity by the current lr. They agree at a constant
  lr and part when the schedule moves.
- a tensor whose raw gradient is exactly zero: solo-learn then skips the decay as well; here it
  still gets its decay (scale 1), as in the default mode.

Exclusions are by structure, not by name: variables of rank <= 1 (biases, BN gamma/beta) get
neither weight decay nor the trust ratio, in both modes.
"""

from __future__ import annotations

import keras
from keras import ops

from nnclr_tf.sgd import MomentumOptimizer


def is_excluded(variable):
  """Biases and normalisation parameters: rank-0/1 variables."""
  return len(variable.shape) <= 1


def _norm(x):
  return ops.sqrt(ops.sum(ops.square(x)))


@keras.saving.register_keras_serializable(package="nnclr_tf")
class LARS(MomentumOptimizer):

  def __init__(self, learning_rate=0.3, momentum=0.9, eta=0.001, weight_decay_rate=1e-6,
               clip_lr=False, name="lars", **kwargs):
    # weight_decay_rate is applied inside the LARS update (coupled, before the trust ratio).
    super().__init__(learning_rate, momentum, weight_decay_rate, name, **kwargs)
    self.eta = eta
    self.clip_lr = bool(clip_lr)

  def update_step(self, gradient, variable, learning_rate):
    if self.clip_lr:
      self._clipped_step(gradient, variable, learning_rate)
      return
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    v = self.velocity(variable)
    if not is_excluded(variable):
      if self.weight_decay_rate:
        g = ops.add(g, ops.multiply(self.weight_decay_rate, variable))
      w_norm = _norm(variable)
      g_norm = _norm(g)
      trust = ops.where(ops.logical_and(w_norm > 0, g_norm > 0),
                        self.eta * w_norm / ops.maximum(g_norm, 1e-30), 1.0)
      lr = lr * ops.cast(trust, variable.dtype)
    self.assign(v, ops.add(ops.multiply(self.momentum, v), ops.multiply(lr, g)))
    self.assign_sub(variable, v)

  def _clipped_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    v = self.velocity(variable)
    if not is_excluded(variable):
      w_norm = _norm(variable)
      g_norm = _norm(g)  # of the raw gradient: LARC's denominator adds the decay's norm apart
      if self.weight_decay_rate:
        g = ops.add(g, ops.multiply(self.weight_decay_rate, variable))
      trust = self.eta * w_norm / ops.maximum(g_norm + self.weight_decay_rate * w_norm, 1e-30)
      # lr = 0 (the first warm-up step) must give scale 1, not 0/0: the step is 0 either way,
      # but the velocity should hold the plain gradient as in SGD.
      scale = ops.minimum(trust / ops.maximum(lr, 1e-30), 1.0)
      scale = ops.where(ops.logical_and(w_norm > 0, g_norm > 0), scale, 1.0)
      g = ops.multiply(g, ops.cast(scale, variable.dtype))
    self.assign(v, ops.add(ops.multiply(self.momentum, v), g))
    self.assign_sub(variable, ops.multiply(lr, v))

  def get_config(self):
    config = super().get_config()
    config.update(eta=self.eta, clip_lr=self.clip_lr)
    return config
