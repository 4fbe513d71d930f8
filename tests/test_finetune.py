import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import data
from nnclr_tf.config import AugmentConfig, Experiment
from nnclr_tf.errors import ConfigError
from nnclr_tf.finetune import label_subset, nesterov_sgd, train_dataset


def imbalanced_labels(seed=0):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(n, c) for c, n in enumerate([500, 300, 900, 120, 180])])
  return rng.permutation(labels)


@pytest.mark.parametrize("fraction,total", [(0.01, 20), (0.1, 200), (0.013, 26)])
def test_label_subset_is_class_balanced(fraction, total):
  labels = imbalanced_labels()
  idx = label_subset(labels, fraction, seed=3)
  assert len(idx) == total and len(np.unique(idx)) == total
  counts = np.bincount(labels[idx], minlength=5)
  assert counts.max() - counts.min() <= 1 and counts.min() >= 1
  assert np.all(np.diff(idx) > 0)


def test_label_subset_is_reproducible_and_seeded():
  labels = imbalanced_labels()
  a = label_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(a, label_subset(labels.copy(), 0.1, seed=3))
  assert not np.array_equal(a, label_subset(labels, 0.1, seed=4))


def test_label_subset_skips_unknown_labels_and_refuses_impossible_requests():
  labels = np.array([0] * 50 + [1] * 50 + [-1] * 900)
  idx = label_subset(labels, 0.2, seed=0)
  assert len(idx) == 20 and np.all(labels[idx] >= 0)   # 20% of the 100 labelled rows
  assert label_subset(labels, 0.001, seed=0).size == 2  # at least one per class
  with pytest.raises(data.DataError, match="label_fraction"):
    label_subset(np.array([0] * 99 + [1]), 0.5, seed=0)
  with pytest.raises(data.DataError, match="label_fraction"):
    label_subset(labels, 0.0, seed=0)


def test_train_dataset_draws_only_the_subset_and_is_deterministic():
  images = np.zeros((40, 8, 8, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(40)   # the top-left red pixel encodes the example index
  src = data.numpy_source(images, np.arange(40) % 4)
  sub = src.subset(label_subset(src.labels, 0.25, seed=1))
  aug = AugmentConfig(crop=False, flip_prob=0.0)
  ds = list(train_dataset(sub, 8, 5, seed=2, aug=aug).take(4).as_numpy_iterator())
  again = list(train_dataset(sub, 8, 5, seed=2, aug=aug).take(4).as_numpy_iterator())
  seen = np.concatenate([np.round(x[:, 0, 0, 0] * 255) for x, _ in ds]).astype(int)
  labels = np.concatenate([y for _, y in ds])
  for (a, b), (c, d) in zip(ds, again):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
  # 20 draws = two epochs of the 10-example subset: each example exactly twice, labels kept.
  assert sorted(seen) == sorted(list(sub.images[:, 0, 0, 0]) * 2)
  np.testing.assert_array_equal(labels, seen % 4)


def test_nesterov_sgd_decays_kernels_only():
  """Decoupled decay at lr x wd per step on rank >= 2 variables; biases and BN (rank 1) keep
  their values when the gradient is zero."""
  kernel = keras.Variable(np.full((2, 3), 2.0, np.float32))
  bias = keras.Variable(np.full((3,), 2.0, np.float32))
  opt = nesterov_sgd(0.1, 0.9, 0.5, [kernel, bias])
  assert opt.nesterov and opt.momentum == 0.9
  opt.apply_gradients([(tf.zeros_like(kernel), kernel), (tf.zeros_like(bias), bias)])
  np.testing.assert_allclose(kernel.numpy(), 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(bias.numpy(), 2.0)
  assert nesterov_sgd(0.1, 0.9, 0.0, [kernel]).weight_decay is None  # SimCLR: none


@pytest.mark.parametrize("flags,needle", [
    ({"finetune_momentum": 1.0}, "--finetune_momentum=1.0 must be in [0, 1)"),
    ({"finetune_weight_decay": -1e-4}, "--finetune_weight_decay=-0.0001 must be"),
    ({"label_fraction": 0.0}, "--label_fraction=0.0 must be in (0, 1]"),
])
def test_finetune_settings_are_checked_when_the_config_is_made(flags, needle):
  with pytest.raises(ConfigError, match=re.escape(needle)):
    Experiment().replace(**flags)
