import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import augment
from nnclr_tf.config import AugmentConfig

SEED = tf.constant([3, 4], tf.int64)


def _image(size=24, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(0.05, 0.95, size=(size, size, 3)).astype(np.float32))


OPS = {
    "flip": lambda x, s, p: augment.flip(x, s, p),
    "jitter": lambda x, s, p: augment.color_jitter(x, s, p=p),
    "grayscale": lambda x, s, p: augment.grayscale(x, s, p),
    "blur": lambda x, s, p: augment.gaussian_blur(x, s, p),
    "solarize": lambda x, s, p: augment.solarize(x, s, p),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_p0_identity_p1_changes_range_and_shape(name):
  x = _image()
  op = OPS[name]
  np.testing.assert_array_equal(op(x, SEED, 0.0).numpy(), x.numpy())
  y = op(x, SEED, 1.0)
  assert y.shape == x.shape
  assert float(tf.reduce_max(tf.abs(y - x))) > 1e-3
  assert float(tf.reduce_min(y)) >= 0.0 and float(tf.reduce_max(y)) <= 1.0
  # Pure: same seed, same output.
  np.testing.assert_array_equal(op(x, SEED, 1.0).numpy(), y.numpy())


def test_solarize_and_grayscale_formulas():
  x = _image()
  s = augment.solarize(x, SEED, 1.0).numpy()
  np.testing.assert_allclose(s, np.where(x.numpy() < 0.5, x.numpy(), 1 - x.numpy()))
  g = augment.grayscale(x, SEED, 1.0).numpy()
  np.testing.assert_allclose(g[..., 0], g[..., 1])
  lum = x.numpy() @ np.array([0.2989, 0.5870, 0.1140])
  np.testing.assert_allclose(g[..., 0], lum, atol=2e-3)


def test_flip_is_mirror():
  x = _image()
  np.testing.assert_array_equal(augment.flip(x, SEED, 1.0).numpy(), x.numpy()[:, ::-1])


def test_crop_static_shape_range_and_determinism():
  x = _image(40)
  a = augment.crop_and_resize(x, SEED, 16, (0.08, 1.0))
  b = augment.crop_and_resize(x, SEED, 16, (0.08, 1.0))
  c = augment.crop_and_resize(x, tf.constant([5, 6], tf.int64), 16, (0.08, 1.0))
  assert a.shape == (16, 16, 3)
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(a.numpy(), c.numpy())
  assert 0.0 <= float(tf.reduce_min(a)) and float(tf.reduce_max(a)) <= 1.0
  # scale=(1,1), ratio=(1,1) on a square image is a plain resize.
  full = augment.crop_and_resize(x, SEED, 16, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(full.numpy(), augment.center_resize(x, 16).numpy(), atol=1e-6)


def test_views_are_asymmetric_and_static():
  x = _image(32)
  cfg = AugmentConfig(blur_prob=(1.0, 0.0), solarize_prob=(0.0, 0.0))
  v1, v2 = augment.two_views(x, SEED, 32, cfg)
  assert v1.shape == v2.shape == (32, 32, 3)
  assert not np.array_equal(v1.numpy(), v2.numpy())
  g = tf.function(lambda im: augment.two_views(im, SEED, 32, cfg))
  w1, w2 = g(x)
  np.testing.assert_allclose(w1.numpy(), v1.numpy(), atol=1e-6)


def test_example_seed_depends_on_epoch_and_index_only():
  a = augment.example_seed(7, 2, 11).numpy()
  assert np.array_equal(a, augment.example_seed(7, 2, 11).numpy())
  assert not np.array_equal(a, augment.example_seed(7, 3, 11).numpy())
  assert not np.array_equal(a, augment.example_seed(7, 2, 12).numpy())
  assert not np.array_equal(a, augment.example_seed(8, 2, 11).numpy())
