"""The backbones: feature sizes, zero-init residual blocks, and the one list of names the CLI's
--backbone enum and build_backbone share (CONTRIBUTING's "Adding a backbone")."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import cli, config
from nnclr_tf.backbones import KERAS_APPLICATIONS, build_backbone


def test_every_listed_backbone_is_a_cli_choice_and_built():
  assert cli.FLAGS["backbone"].parser.enum_values == list(config.BACKBONES)
  built_here = {"resnet50", "resnet18_cifar", "small_cnn"}
  assert set(config.BACKBONES) == built_here | set(KERAS_APPLICATIONS)
  with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
    build_backbone("resnet9", (16, 16, 3))


@pytest.mark.parametrize("name,size,dim", [("small_cnn", 16, 32), ("resnet18_cifar", 32, 512),
                                           ("resnet50", 64, 2048)])
def test_backbone_feature_dims(name, size, dim):
  kw = {"width": 8} if name == "small_cnn" else {}
  m = build_backbone(name, (size, size, 3), global_bn=False, **kw)
  assert m.output.shape[-1] == dim
  assert m(tf.zeros([2, size, size, 3])).shape == (2, dim)


@pytest.mark.parametrize("name,size,blocks", [("resnet18_cifar", 16, 8), ("resnet50", 32, 16)])
def test_zero_init_residual_starts_each_block_as_the_identity(name, size, blocks):
  """On (SimCLR/BYOL): a block's residual branch cannot reach the output at initialisation, so
  new random weights in its convolutions leave the features as they were, and one BN per block
  starts at gamma 0. Off (PyTorch recipes): every gamma starts at 1 and the branch counts."""
  x = np.random.default_rng(0).random((2, size, size, 3)).astype(np.float32)
  for zero_init in (True, False):
    keras.utils.set_random_seed(0)
    m = build_backbone(name, (size, size, 3), global_bn=False, width=8,
                       zero_init_residual=zero_init)
    gammas = [layer.gamma.numpy() for layer in m.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    assert sum(not g.any() for g in gammas) == (blocks if zero_init else 0)
    assert sum(bool(np.all(g == 1)) for g in gammas) == len(gammas) - (blocks if zero_init else 0)
    before = m(x, training=False).numpy()
    conv = m.get_layer("stage2_block1_conv1")
    conv.kernel.assign(np.random.default_rng(1).normal(size=conv.kernel.shape))
    after = m(x, training=False).numpy()
    if zero_init:
      np.testing.assert_array_equal(after, before)
    else:
      assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()
