"""Momentum SGD with coupled (L2) weight decay, in PyTorch's `torch.optim.SGD` convention.

Per variable w with gradient g:
  g <- g + weight_decay * w       (every variable, biases and BN included)
  v <- momentum * v + g
  w <- w - lr * v

Two things set it apart from keras.optimizers.SGD(weight_decay=...):
- the decay goes through the gradient, so momentum carries it (Keras' is decoupled: w -= lr*wd*w);
- the schedule's lr multiplies the whole velocity at each step (Keras folds lr into the velocity
  as it accumulates), which matters once the lr moves.
Every variable is decayed because that is what the lightly CIFAR-10 recipe this mode reproduces
does: `torch.optim.SGD(model.parameters(), weight_decay=5e-4)` has a single parameter group.
"""

from __future__ import annotations

import keras
from keras import ops


class MomentumOptimizer(keras.optimizers.Optimizer):
  """What CoupledSGD and LARS share: a momentum slot per variable and a coupled weight decay
  (`weight_decay_rate`), with the base class's decoupled `weight_decay` kept off so that nothing
  is decayed twice."""

  def __init__(self, learning_rate, momentum, weight_decay_rate, name, **kwargs):
    kwargs.pop("weight_decay", None)
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = momentum
    self.weight_decay_rate = weight_decay_rate

  def build(self, var_list):
    if self.built:
      return
    super().build(var_list)
    self._momentums = self.add_optimizer_variables(var_list, "momentum")

  def velocity(self, variable):
    return self._momentums[self._get_variable_index(variable)]

  def get_config(self):
    config = super().get_config()
    config.update(momentum=self.momentum, weight_decay_rate=self.weight_decay_rate)
    return config


@keras.saving.register_keras_serializable(package="nnclr_tf")
class CoupledSGD(MomentumOptimizer):

  def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay_rate=0.0, name="coupled_sgd",
               **kwargs):
    super().__init__(learning_rate, momentum, weight_decay_rate, name, **kwargs)

  def update_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    if self.weight_decay_rate:
      g = ops.add(g, ops.multiply(self.weight_decay_rate, variable))
    v = self.velocity(variable)
    self.assign(v, ops.add(ops.multiply(self.momentum, v), g))
    self.assign_sub(variable, ops.multiply(lr, v))
