"""Projection and prediction MLPs, as specified in the NNCLR paper (Sec. 4.1, "Implementation"):

  "The projection MLP has 3 layers of sizes [2048, 2048, d] ... with batch normalization [after
   each layer] and ReLU after all but the last layer. The prediction MLP has 2 layers of sizes
   [4096, d] ... with batch normalization and ReLU on the hidden layer." (d = 256)

Dense layers followed by BN carry no bias (BN's beta does that job).
"""

from __future__ import annotations

import keras
from keras import layers

from nnclr_tf.batchnorm import BatchNormalization


def _mlp(input_dim, dims, bn_last, global_bn, name):
  inputs = keras.Input(shape=(input_dim,))
  x = inputs
  for i, d in enumerate(dims):
    last = i == len(dims) - 1
    with_bn = bn_last or not last
    x = layers.Dense(d, use_bias=not with_bn, name=f"{name}_dense{i + 1}")(x)
    if with_bn:
      x = BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=global_bn,
                                    name=f"{name}_bn{i + 1}")(x)
    if not last:
      x = layers.ReLU()(x)
  # Outputs stay float32 under mixed precision: they feed normalisation, the NN lookup and the loss.
  x = layers.Activation("linear", dtype="float32", name=f"{name}_out")(x)
  return keras.Model(inputs, x, name=name)


def projection_head(input_dim, hidden_dim=2048, out_dim=256, num_layers=3, global_bn=True):
  """[hidden] * (num_layers - 1) + [out_dim], BN after every layer, ReLU after all but the last."""
  dims = [hidden_dim] * (num_layers - 1) + [out_dim]
  return _mlp(input_dim, dims, bn_last=True, global_bn=global_bn, name="projector")


def prediction_head(dim=256, hidden_dim=4096, global_bn=True):
  """[hidden_dim, dim], BN + ReLU on the hidden layer only."""
  return _mlp(dim, [hidden_dim, dim], bn_last=False, global_bn=global_bn, name="predictor")
