"""Stateless image augmentations and the BYOL asymmetric pipeline.

Every op is a pure function of (image, seed, parameters): `seed` is an int32/int64 tensor of shape
[2]. Nothing here draws from a stateful generator, so the same seed gives the same image on any
machine, replica count or tf.data parallelism.

A view is made in two halves: `crop_view`, per example where the image is read (crop, resize,
rounding a uint8 image to uint8, flip, and the colour stage's coins and factors), then
`colour.apply` to a batch of them (colour jitter, grayscale, blur, solarize), on the host after
batching or in the train step (`--augment_on`). `augment_view` / `two_views` are both halves
for one image.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from nnclr_tf import colour
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
  out = _resize_crop(window, size)
  if window.dtype == tf.uint8:
    out = out * (1.0 / 255.0)
  return tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0), [size, size, 3])


def resize_crop(window, size):
  """A crop window [h, w, 3] resized to [size, size, 3], in its own dtype: uint8 rounded to the
  nearest level, as torchvision's PIL crops are (what the colour stage starts from, a quarter of
  float32's bytes to batch and to send to an accelerator); float as `resize_window` (not
  quantized, and a NaN pixel stays NaN for the non-finite guard to see)."""
  if window.dtype != tf.uint8:
    return resize_window(window, size)
  out = tf.round(tf.clip_by_value(_resize_crop(window, size), 0.0, 255.0))
  return tf.ensure_shape(tf.cast(out, tf.uint8), [size, size, 3])


def _resize_crop(window, size):
  """`resize` of one crop window. Enlarging (both sides at most `size`: the common case for a
  random crop), antialiasing is a no-op (scale_and_translate's triangle kernel then spans one
  input pixel, plain bilinear's; equal within 5e-5 of a level) and plain bilinear costs a fifth
  (benchmarks/RESULTS.md)."""
  shape = tf.shape(window)
  x = window[tf.newaxis]
  return tf.cond(tf.logical_and(shape[0] <= size, shape[1] <= size),
                 lambda: tf.image.resize(x, [size, size], method="bilinear"),
                 lambda: resize(x, size))[0]


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


def augment_view(image, seed, size, cfg: AugmentConfig, view: int):
  """One view of the BYOL pipeline, float [size, size, 3] in [0, 1]; `view` 0 or 1 picks the
  asymmetric blur/solarize odds. `image` is uint8 or float [H, W, 3]."""
  return coloured(crop_view(tf.shape(image), slicer(image), seed, size, cfg, view))


def crop_flip(cfg: AugmentConfig) -> AugmentConfig:
  """`cfg` with its random resized crop and flip only: the training views of the supervised
  protocols (SimCLR appendix B: "Only random cropping (with random left-to-right flipping ...)
  is used for preprocessing"). Crop scale, ratio, sampler and flip probability stay the
  pretraining's, so data that must not be flipped (digits) is not."""
  return dataclasses.replace(cfg, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                             solarize_prob=(0.0, 0.0))


def crop_view(shape, read_window, seed, size, cfg: AugmentConfig, view: int):
  """The per-example half of a view of the image of `shape` whose pixels in a box are
  `read_window(begin, size)`: ([size, size, 3] cropped, resized (`resize_crop`: uint8 images
  rounded to uint8) and flipped; float32 [colour.NUM_PARAMS], its colour stage's coins and
  factors). `colour.apply` of the pair is the view. Seeds: six split from `seed` (crop, flip,
  jitter, grayscale, blur, solarize). The boxes depend on `shape` alone, so `read_window` may
  decode just that window of a JPEG and give the views of the decoded image."""
  s = split_seed(seed, 6)
  if cfg.crop:
    begin, crop_size = crop_window(shape, s[0], cfg.crop_scale, cfg.crop_ratio, cfg.crop_sampler)
  else:
    begin, crop_size = tf.zeros([3], tf.int32), tf.cast(shape, tf.int32)
  image = resize_crop(read_window(begin, crop_size), size)
  return flip(image, s[1], cfg.flip_prob), colour.draw(s, cfg, view)


def crop_views(shape, read_window, seed, size, cfg: AugmentConfig):
  """(crop_view of view 0, crop_view of view 1), with independent seeds split from `seed`."""
  s = split_seed(seed, 2)
  return (crop_view(shape, read_window, s[0], size, cfg, 0),
          crop_view(shape, read_window, s[1], size, cfg, 1))


def slicer(image):
  """The `read_window` of a decoded image: its pixels in a box."""
  return lambda begin, size: tf.slice(image, begin, size)


def coloured(half):
  """The float view of one `crop_view` half: its colour stage applied."""
  image, params = half
  return colour.apply(image[tf.newaxis], params[tf.newaxis])[0]


def two_views(image, seed, size, cfg: AugmentConfig):
  """(view1, view2) of one uint8 or float image [H, W, 3]; the two views use independent seeds
  split from `seed`."""
  return tuple(coloured(half) for half in crop_views(tf.shape(image), slicer(image), seed, size,
                                                      cfg))
