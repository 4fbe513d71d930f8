"""Small data shared by tests/test_sources.py and tests/test_pipelines.py."""

import numpy as np
import tensorflow as tf

from nnclr_tf import sources


def _toy(n=40, size=12, classes=4):
  """A labelled in-memory source of random uint8 images."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
  return sources.numpy_source(images, np.arange(n) % classes)


def _take(ds, k):
  """The first k elements of a dataset as numpy."""
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(k)]
