"""Backbones: build_backbone(name, input_shape) -> keras.Model mapping [0,1] images to features.

All BatchNormalization layers come from one factory so that `global_bn=True` makes every one of
them synchronised across replicas (the paper trains with global BN). The `keras_*` names are
keras.applications ResNets (random init), standardised like the built-in ones, with their
BatchNormalization swapped for the same factory's. A user's own keras.Model goes through
`wrap_backbone` instead and keeps its layers as they are.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

from nnclr_tf.batchnorm import BatchNormalization
from nnclr_tf.config import BACKBONES

# ImageNet channel statistics; inputs arrive in [0, 1] and are standardised inside the model, so an
# exported encoder needs no preprocessing beyond scaling uint8 to [0, 1].
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _bn(global_bn, name, gamma_zero=False):
  return BatchNormalization(
      momentum=0.9, epsilon=1e-5, synchronized=global_bn, name=name,
      gamma_initializer="zeros" if gamma_zero else "ones")


def _conv(filters, kernel, stride, name):
  return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                       kernel_initializer="he_normal", name=name)


def _standardise(x):
  return layers.Normalization(mean=_MEAN, variance=[s * s for s in _STD], name="standardise")(x)


def _basic_block(x, filters, stride, bn, name, zero_init):
  shortcut = x
  y = _conv(filters, 3, stride, name + "_conv1")(x)
  y = layers.ReLU()(bn(name + "_bn1")(y))
  y = _conv(filters, 3, 1, name + "_conv2")(y)
  y = bn(name + "_bn2", gamma_zero=zero_init)(y)
  if stride != 1 or x.shape[-1] != filters:
    shortcut = bn(name + "_down_bn")(_conv(filters, 1, stride, name + "_down")(x))
  return layers.ReLU()(layers.Add()([y, shortcut]))


def _bottleneck(x, filters, stride, bn, name, zero_init):
  shortcut = x
  y = layers.ReLU()(bn(name + "_bn1")(_conv(filters, 1, 1, name + "_conv1")(x)))
  y = layers.ReLU()(bn(name + "_bn2")(_conv(filters, 3, stride, name + "_conv2")(y)))
  y = bn(name + "_bn3", gamma_zero=zero_init)(_conv(filters * 4, 1, 1, name + "_conv3")(y))
  if stride != 1 or x.shape[-1] != filters * 4:
    shortcut = bn(name + "_down_bn")(_conv(filters * 4, 1, stride, name + "_down")(x))
  return layers.ReLU()(layers.Add()([y, shortcut]))


def _resnet(inputs, block, depths, width, bn, cifar_stem, zero_init):
  x = _standardise(inputs)
  if cifar_stem:  # 3x3 stride-1 stem, no max-pool: keeps 32x32 resolution for CIFAR
    x = layers.ReLU()(bn("stem_bn")(_conv(width, 3, 1, "stem_conv")(x)))
  else:
    x = layers.ReLU()(bn("stem_bn")(_conv(width, 7, 2, "stem_conv")(x)))
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
  for stage, depth in enumerate(depths):
    for i in range(depth):
      stride = 2 if (i == 0 and stage > 0) else 1
      x = block(x, width * 2 ** stage, stride, bn, f"stage{stage + 1}_block{i + 1}", zero_init)
  return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def _small_cnn(inputs, width, bn):
  x = _standardise(inputs)
  for i, mult in enumerate((1, 2, 4)):
    x = _conv(width * mult, 3, 1 if i == 0 else 2, f"conv{i + 1}")(x)
    x = layers.ReLU()(bn(f"bn{i + 1}")(x))
  return layers.GlobalAveragePooling2D(name="avg_pool")(x)


# keras.applications constructors by backbone name; they take images in their own pixel scale,
# so inputs are standardised here and each application's own preprocessing is left out.
KERAS_APPLICATIONS = {
    "keras_resnet50": "ResNet50", "keras_resnet101": "ResNet101", "keras_resnet152": "ResNet152",
    "keras_resnet50v2": "ResNet50V2", "keras_resnet101v2": "ResNet101V2",
    "keras_resnet152v2": "ResNet152V2",
}


def _swap_batchnorm(model, make_bn, name=None):
  """A clone of the functional `model` with every BatchNormalization made by `make_bn(config)`
  and every weight copied, so its outputs equal the original's."""
  def clone(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
      return make_bn(layer.get_config())
    return layer.__class__.from_config(layer.get_config())

  copy = keras.models.clone_model(model, clone_function=clone)
  copy.set_weights(model.get_weights())
  if name:
    copy.name = name
  return copy


def _keras_application(name, inputs, global_bn):
  app = getattr(keras.applications, KERAS_APPLICATIONS[name])
  model = app(include_top=False, weights=None, input_tensor=_standardise(inputs), pooling="avg")

  def fused(config):
    return BatchNormalization.from_config({**config, "synchronized": global_bn})

  return _swap_batchnorm(model, fused, name)


def stock_layers(model):
  """`model` with nnclr_tf's BatchNormalization replaced by keras.layers.BatchNormalization (same
  config and weights): loadable without nnclr_tf. A model without it is returned as it is."""
  if not any(type(layer) is BatchNormalization for layer in model.layers):
    return model
  return _swap_batchnorm(model, keras.layers.BatchNormalization.from_config, model.name)


def wrap_backbone(backbone, input_shape):
  """A user's keras.Model (float [0, 1] images -> features [N, D]) as an encoder of fixed input
  `input_shape` named "images"; refuses one whose output is not one feature vector per image."""
  inputs = keras.Input(shape=tuple(input_shape), name="images")
  try:
    out = backbone(inputs)
  except Exception as e:
    raise ValueError(f"backbone {backbone.name!r} cannot take images of shape "
                     f"{tuple(input_shape)} ({type(e).__name__}: {e})") from None
  if not isinstance(out, keras.KerasTensor) or len(out.shape) != 2 or out.shape[-1] is None:
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"backbone {backbone.name!r} must map images to one feature vector [N, D], "
                     f"got {shape}; pool its output (e.g. keras.applications.*(include_top="
                     "False, pooling='avg'))")
  return keras.Model(inputs, out, name=f"{backbone.name}_encoder")


def build_backbone(name, input_shape, global_bn=True, width=64, zero_init_residual=True):
  """Returns a keras.Model: float images in [0, 1] of `input_shape` -> pooled features [N, D].

  zero_init_residual: the last BatchNormalization of each residual block starts with gamma 0, so
  every block starts as the identity (Goyal et al. 2017; SimCLR's and BYOL's ResNets). PyTorch
  recipes (torchvision's default, lightly, solo-learn) start it at 1. Only resnet18_cifar and
  resnet50 take it; the keras_* applications keep their own initialisation."""
  bn = functools.partial(_bn, global_bn)
  inputs = keras.Input(shape=tuple(input_shape), name="images")
  if name == "resnet50":
    out = _resnet(inputs, _bottleneck, (3, 4, 6, 3), width, bn, False, zero_init_residual)
  elif name == "resnet18_cifar":
    out = _resnet(inputs, _basic_block, (2, 2, 2, 2), width, bn, True, zero_init_residual)
  elif name == "small_cnn":
    out = _small_cnn(inputs, width, bn)
  elif name in KERAS_APPLICATIONS:
    return _keras_application(name, inputs, global_bn)
  else:
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
  return keras.Model(inputs, out, name=name)
