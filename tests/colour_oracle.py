"""The oracle of the batched colour stage: the per-example path it replaced (nnclr_tf before issue
27), one image at a time with TensorFlow's own kernels (adjust_contrast, adjust_saturation,
adjust_hue, a depthwise blur) and its random order from tf.switch_case, drawing each coin and
factor from the view's seeds where it is used."""

import functools

import tensorflow as tf

from nnclr_tf import augment

# The per-example coin (augment.random_apply, which flip still uses) and seed split.
_random_apply = augment.random_apply
_split = augment.split_seed


def _clip(x):
  return tf.clip_by_value(x, 0.0, 1.0)


def color_jitter(image, seed, brightness, contrast, saturation, hue, p):
  seeds = _split(seed, 6)
  ops = [
      lambda x: _clip(x * tf.random.stateless_uniform([], seeds[1], 1 - brightness,
                                                        1 + brightness)),
      lambda x: _clip(tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast,
                                                         seeds[2])),
      lambda x: _clip(tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation,
                                                           seeds[3])),
      lambda x: _clip(tf.image.stateless_random_hue(x, hue, seeds[4]))]

  def jitter(img):
    order = tf.argsort(tf.random.stateless_uniform([4], seeds[5]))
    for i in range(4):
      img = tf.switch_case(order[i], [functools.partial(op, img) for op in ops])
    return img

  return _random_apply(jitter, image, seeds[0], p)


def gaussian_blur(image, seed, p, sigma=(0.1, 2.0), kernel_fraction=0.1):
  radius = max(1, int(image.shape[0] * kernel_fraction) // 2)
  seeds = _split(seed, 2)

  def blur(img):
    s = tf.random.stateless_uniform([], seeds[1], sigma[0], sigma[1])
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-tf.square(x) / (2.0 * tf.square(s)))
    k = k / tf.reduce_sum(k)
    kh = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
    kv = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
    out = tf.nn.depthwise_conv2d(img[tf.newaxis], kh, [1, 1, 1, 1], "SAME")
    out = tf.nn.depthwise_conv2d(out, kv, [1, 1, 1, 1], "SAME")
    return _clip(out[0])

  return _random_apply(blur, image, seeds[0], p)


def colour_view(image, seed, cfg, view):
  """The colour stage of one view: `image` float [S, S, 3] (the cropped, flipped view) and the
  view's seed, as augment.crop_view splits it."""
  s = _split(seed, 6)
  if cfg.jitter_prob > 0:
    image = color_jitter(image, s[2], cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
                         cfg.jitter_prob)
  image = _random_apply(lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), image, s[3],
                        cfg.grayscale_prob)
  image = gaussian_blur(image, s[4], cfg.blur_prob[view])
  return _random_apply(lambda x: tf.where(x < 0.5, x, 1.0 - x), image, s[5],
                       cfg.solarize_prob[view])
