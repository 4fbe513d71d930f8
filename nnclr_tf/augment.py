"""Stateless image augmentations and the BYOL asymmetric pipeline.

Every op is a pure function of (image, seed, parameters): `image` is float32 [H, W, 3] in [0, 1],
`seed` an int32/int64 tensor of shape [2]. Nothing here draws from a stateful generator, so the same
seed gives the same image on any machine, replica count or tf.data parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import tensorflow as tf

from nnclr_tf.config import AugmentConfig


def split_seed(seed, num):
  """`num` independent seeds [num, 2] derived from one."""
  return tf.random.experimental.stateless_split(seed, num=num)


def example_seed(base_seed, epoch, index):
  """The per-example seed: a function of the run seed, the epoch and the example's index only."""
  s = tf.stack([tf.cast(base_seed, tf.int64), tf.constant(0x5EED, tf.int64)])
  s = tf.random.experimental.stateless_fold_in(s, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(index, tf.int64))


def random_apply(fn, image, seed, p):
  """Applies `fn(image)` with probability `p` (static p=0 / p=1 skip the coin)."""
  if p <= 0.0:
    return image
  if p >= 1.0:
    return fn(image)
  coin = tf.random.stateless_uniform([], seed=seed)
  return tf.cond(coin < p, lambda: fn(image), lambda: image)


def crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), sampler="inception"):
  """(begin, size), int32 [3] each: the random resized crop's box (Szegedy et al. 2015) in an image
  of `shape` [H, W, C], `scale` of the area at `ratio` aspect. It depends on the shape only, so a
  reader can decode just this window of an encoded image and get the crop a decoded one gets.

  sampler "inception": tf.image.stateless_sample_distorted_bounding_box (SimCLR's and the Model
  Garden's TF code); "torchvision": torchvision's RandomResizedCrop.get_params, which the PyTorch
  recipes (solo-learn, lightly) use and which draws larger crops at the same (scale, ratio)."""
  if sampler == "torchvision":
    return torchvision_crop_window(shape, seed, scale, ratio)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(shape, tf.int32),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=ratio,
      area_range=scale,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def torchvision_crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """torchvision's RandomResizedCrop box, drawn statelessly with static shapes (XLA, TPU): all
  `attempts` tries at once (area fraction ~ U(scale), aspect ~ exp(U(log ratio)), sides
  rounded), the first that fits is taken, its corner uniform over the positions that fit; when
  none fits, the centre crop of the whole image clamped to `ratio`."""
  shape = tf.cast(shape, tf.int32)
  h_img, w_img = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  s = split_seed(seed, 3)
  area = h_img * w_img * tf.random.stateless_uniform([attempts], s[0], scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s[1], math.log(ratio[0]),
                                               math.log(ratio[1])))
  # tf.round rounds half to even, as Python's round() in torchvision does.
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32))
  # The fallback: the whole image, cut to the nearest aspect inside `ratio`.
  in_ratio = w_img / h_img
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)
  any_fit = tf.reduce_any(fits)
  ch = tf.cast(tf.where(any_fit, h[first], fb_h), tf.int32)
  cw = tf.cast(tf.where(any_fit, w[first], fb_w), tf.int32)
  # torch.randint(0, H - h + 1): each of the H - h + 1 corners equally likely.
  u = tf.random.stateless_uniform([2], s[2])
  top = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(shape[0] - ch + 1, tf.float32)), tf.int32),
                   shape[0] - ch)
  left = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(shape[1] - cw + 1, tf.float32)), tf.int32),
                    shape[1] - cw)
  top = tf.where(any_fit, top, (shape[0] - ch) // 2)
  left = tf.where(any_fit, left, (shape[1] - cw) // 2)
  return tf.stack([top, left, 0]), tf.stack([ch, cw, shape[2]])


def crop_and_resize(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                    sampler="inception"):
  """Random resized crop of `crop_window`, resized to size x size: float32 in [0, 1]."""
  begin, crop_size = crop_window(tf.shape(image), seed, scale, ratio, sampler)
  return resize_window(tf.slice(image, begin, crop_size), size)


def resize_window(window, size):
  """uint8 or float [h, w, 3] -> float [size, size, 3] in [0, 1]. A uint8 window is resized before
  it is scaled to [0, 1]: the float copy is then of the small output, not of the decoded image."""
  out = resize(window[tf.newaxis], size)[0]
  if window.dtype == tf.uint8:
    out = out * (1.0 / 255.0)
  return tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0), [size, size, 3])


def resize(images, size):
  """[N, H, W, C] -> [N, size, size, C] (or [N, h, w, C] for size = [h, w]): bilinear,
  antialiased when shrinking (equal to plain bilinear when enlarging). The one resize of
  un-augmented images: images cached in memory at the training size, the evaluation transform and
  the exported encoder's preprocessing all use it, so a served image meets the network exactly as
  evaluation's did (up to the cache's uint8 rounding); the random crop uses it too, so a
  whole-image crop is the evaluation view at crop fraction 1."""
  hw = [size, size] if isinstance(size, int) else size
  return tf.image.resize(images, hw, method="bilinear", antialias=True)


def center_resize(image, size):
  """Resize to size x size, no randomness: the non-random training view, and the evaluation
  transform at crop fraction 1 (see `eval_transform`)."""
  return resize_window(image, size)


def eval_short_side(size, crop_fraction):
  """The shorter side an image is resized to before the centre crop: size / crop_fraction rounded
  half up (224 / 0.875 = 256)."""
  return int(math.floor(size / crop_fraction + 0.5))


def eval_transform(image, size, crop_fraction=1.0):
  """The one evaluation transform: uint8 or float [H, W, 3] or [N, H, W, 3] (one H, W per batch)
  -> float [.., size, size, 3] in [0, 1].

  crop_fraction 1: the whole image resized to size x size (aspect ratio not kept).
  crop_fraction f < 1 (ImageNet protocol, f = 0.875): the image is resized, keeping its aspect
  ratio, so that its shorter side is T = eval_short_side(size, f) and its longer side L x T /
  shorter rounded half up, then the centre size x size is cut out, starting at
  floor((side - size) / 2) (an odd leftover pixel goes to the bottom / right). Resizing is
  `resize` in both cases.
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"eval crop fraction {crop_fraction} must be in (0, 1]")
  image = tf.convert_to_tensor(image)
  single = image.shape.rank == 3
  x = tf.image.convert_image_dtype(image, tf.float32)
  if single:
    x = x[tf.newaxis]
  if crop_fraction == 1.0:
    x = resize(x, size)
  else:
    target = eval_short_side(size, crop_fraction)
    shape = tf.shape(x, out_type=tf.int64)
    h, w = shape[1], shape[2]
    short = tf.minimum(h, w)
    # Integer arithmetic keeps the rounding exact: round(L T / short) = (2 L T + short) // 2 short.
    new_h = (2 * h * target + short) // (2 * short)
    new_w = (2 * w * target + short) // (2 * short)
    x = resize(x, tf.cast(tf.stack([new_h, new_w]), tf.int32))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size, :]
  x = tf.clip_by_value(x, 0.0, 1.0)
  x = tf.ensure_shape(x, [None, size, size, 3])
  return x[0] if single else x


def flip(image, seed, p=0.5):
  return random_apply(tf.image.flip_left_right, image, seed, p)


def _brightness(image, seed, strength):
  # Multiplicative, as torchvision's ColorJitter used by BYOL/NNCLR (not tf's additive delta).
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def _contrast(image, seed, strength):
  out = tf.image.stateless_random_contrast(image, 1.0 - strength, 1.0 + strength, seed)
  return tf.clip_by_value(out, 0.0, 1.0)


def _saturation(image, seed, strength):
  out = tf.image.stateless_random_saturation(image, 1.0 - strength, 1.0 + strength, seed)
  return tf.clip_by_value(out, 0.0, 1.0)


def _hue(image, seed, strength):
  return tf.clip_by_value(tf.image.stateless_random_hue(image, strength, seed), 0.0, 1.0)


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8):
  """Brightness, contrast, saturation and hue jitter in a random order, applied with prob. `p`."""
  seeds = split_seed(seed, 6)

  ops = [lambda x: _brightness(x, seeds[1], brightness),
         lambda x: _contrast(x, seeds[2], contrast),
         lambda x: _saturation(x, seeds[3], saturation),
         lambda x: _hue(x, seeds[4], hue)]

  def jitter(img):
    order = tf.argsort(tf.random.stateless_uniform([4], seeds[5]))
    for i in range(4):
      img = tf.switch_case(order[i], [functools.partial(op, img) for op in ops])
    return img

  return random_apply(jitter, image, seeds[0], p)


def grayscale(image, seed, p=0.2):
  return random_apply(lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), image, seed, p)


def gaussian_blur(image, seed, p=1.0, sigma=(0.1, 2.0), kernel_fraction=0.1):
  """Gaussian blur with sigma ~ U(0.1, 2.0) and a kernel of 10% of the image side (BYOL)."""
  size = image.shape[0] or 224
  radius = max(1, int(size * kernel_fraction) // 2)
  seeds = split_seed(seed, 2)

  def blur(img):
    s = tf.random.stateless_uniform([], seeds[1], sigma[0], sigma[1])
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-tf.square(x) / (2.0 * tf.square(s)))
    k = k / tf.reduce_sum(k)
    kh = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
    kv = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
    out = tf.nn.depthwise_conv2d(img[tf.newaxis], kh, [1, 1, 1, 1], "SAME")
    out = tf.nn.depthwise_conv2d(out, kv, [1, 1, 1, 1], "SAME")
    return tf.clip_by_value(out[0], 0.0, 1.0)

  return random_apply(blur, image, seeds[0], p)


def solarize(image, seed, p=0.2, threshold=0.5):
  return random_apply(lambda x: tf.where(x < threshold, x, 1.0 - x), image, seed, p)


def augment_view(image, seed, size, cfg: AugmentConfig, view: int):
  """One view of the BYOL pipeline; `view` 0 or 1 picks the asymmetric blur/solarize odds.
  `image` is uint8 or float [H, W, 3]."""
  return _view(tf.shape(image), lambda b, c: tf.slice(image, b, c), seed, size, cfg, view)


def view_windows(shape, read_window, seed, size, cfg: AugmentConfig, view: int = 0):
  """`augment_view` of an image not decoded yet (see `two_views_windows`)."""
  return _view(shape, read_window, seed, size, cfg, view)


def crop_flip(cfg: AugmentConfig) -> AugmentConfig:
  """`cfg` with its random resized crop and flip only: the training views of the supervised
  protocols (SimCLR appendix B: "Only random cropping (with random left-to-right flipping ...)
  is used for preprocessing"). Crop scale, ratio, sampler and flip probability stay the
  pretraining's, so data that must not be flipped (digits) is not."""
  return dataclasses.replace(cfg, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                             solarize_prob=(0.0, 0.0))


def _view(shape, read_window, seed, size, cfg, view):
  """augment_view of the image of `shape` whose pixels in a box are `read_window(begin, size)`."""
  s = split_seed(seed, 6)
  if cfg.crop:
    begin, crop_size = crop_window(shape, s[0], cfg.crop_scale, cfg.crop_ratio, cfg.crop_sampler)
  else:
    begin, crop_size = tf.zeros([3], tf.int32), tf.cast(shape, tf.int32)
  image = resize_window(read_window(begin, crop_size), size)
  image = flip(image, s[1], cfg.flip_prob)
  if cfg.jitter_prob > 0:
    image = color_jitter(image, s[2], cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
                         cfg.jitter_prob)
  image = grayscale(image, s[3], cfg.grayscale_prob)
  image = gaussian_blur(image, s[4], cfg.blur_prob[view])
  image = solarize(image, s[5], cfg.solarize_prob[view])
  return tf.ensure_shape(image, [size, size, 3])


def two_views(image, seed, size, cfg: AugmentConfig):
  """(view1, view2) of one uint8 or float image [H, W, 3]; the two views use independent seeds
  split from `seed`."""
  return two_views_windows(tf.shape(image), lambda b, c: tf.slice(image, b, c), seed, size, cfg)


def two_views_windows(shape, read_window, seed, size, cfg: AugmentConfig):
  """`two_views` of an image not decoded yet: `shape` is its [H, W, 3] and `read_window(begin,
  size)` returns its pixels in that box (int32 [3] each), e.g. by decoding only that window of a
  JPEG. The boxes, and so the views, are those `two_views` makes of the decoded image."""
  s = split_seed(seed, 2)
  return (_view(shape, read_window, s[0], size, cfg, 0),
          _view(shape, read_window, s[1], size, cfg, 1))
