"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks").

Per variable w with gradient g, as used by SimCLR/BYOL/NNCLR:
  g <- g + weight_decay * w                          (weights only)
  trust = eta * ||w|| / ||g||  if both norms > 0 else 1   (weights only; biases/BN: trust = 1)
  v <- momentum * v + lr * trust * g
  w <- w - v

Exclusions are by structure, not by name: variables of rank <= 1 (biases, BN gamma/beta) get
neither weight decay nor the trust ratio.
"""

from __future__ import annotations

import keras
from keras import ops


def is_excluded(variable):
  """Biases and normalisation parameters: rank-0/1 variables."""
  return len(variable.shape) <= 1


@keras.saving.register_keras_serializable(package="nnclr_tf")
class LARS(keras.optimizers.Optimizer):

  def __init__(self, learning_rate=0.3, momentum=0.9, eta=0.001, weight_decay_rate=1e-6,
               name="lars", **kwargs):
    # weight_decay_rate is applied inside the LARS update (coupled, before the trust ratio); the
    # base class's decoupled `weight_decay` must stay off or decay would be applied twice.
    kwargs.pop("weight_decay", None)
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = momentum
    self.eta = eta
    self.weight_decay_rate = weight_decay_rate

  def build(self, var_list):
    if self.built:
      return
    super().build(var_list)
    self._momentums = self.add_optimizer_variables(var_list, "momentum")

  def update_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    v = self._momentums[self._get_variable_index(variable)]
    if not is_excluded(variable):
      if self.weight_decay_rate:
        g = ops.add(g, ops.multiply(self.weight_decay_rate, variable))
      w_norm = ops.sqrt(ops.sum(ops.square(variable)))
      g_norm = ops.sqrt(ops.sum(ops.square(g)))
      trust = ops.where(ops.logical_and(w_norm > 0, g_norm > 0),
                        self.eta * w_norm / ops.maximum(g_norm, 1e-30), 1.0)
      lr = lr * ops.cast(trust, variable.dtype)
    self.assign(v, ops.add(ops.multiply(self.momentum, v), ops.multiply(lr, g)))
    self.assign_sub(variable, v)

  def get_config(self):
    config = super().get_config()
    config.update(momentum=self.momentum, eta=self.eta, weight_decay_rate=self.weight_decay_rate)
    return config
