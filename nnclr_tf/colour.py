"""The colour stage of the BYOL views, applied to a batch: colour jitter (brightness, contrast,
saturation and hue in a random order per example), grayscale, Gaussian blur and solarize.

The stage is split in two so that it can run away from the crop:
  `draw(seeds, cfg, view)`   per example, where the crop is made (tf.data): every coin and factor
                             of the view as a float32 [NUM_PARAMS] vector, drawn from the view's
                             stateless seeds exactly as the per-example ops drew them;
  `apply(images, params)`    per batch, wherever it runs (the host's tf.data, or the train step
                             under the strategy and XLA): uint8 or float [B, S, S, 3] and
                             [B, NUM_PARAMS] -> float32 [B, S, S, 3] in [0, 1]. Nothing in it is
                             random, so the views are a pure function of (images, params).

Each op is written once, on the image as three planes [B, S, S] with per-example factors
[B, 1, 1], and is TF's op (tf.image.adjust_contrast / adjust_saturation / adjust_hue, the
per-example path's) in closed form: saturation and hue share one pass through the HSV hexcone,
which is also why `apply` can run both as the same op in the rounds of the random order.
tests/colour_oracle.py keeps the per-example path as the oracle.

Two schedules give the same views (tests/test_colour.py):
  vectorised (default): each jitter round computes the four ops for the whole batch and keeps,
    per example, the one its order names; blur is one depthwise convolution for the whole batch,
    kept where the coin says. Static shapes, no data-dependent control flow beyond skipping a
    stage no example uses: the accelerator schedule (`--augment_on=device`).
  host: a loop over examples takes each from its uint8 crop to its float jittered and greyed
    view (switching to the one op each jitter round needs; its passes stay in cache), and only
    the examples whose coin says blur are blurred (gathered, padded to a power of two >= 8, one
    depthwise convolution, and put back with the clip and solarize in one XLA pass); a view
    whose every example is blurred (BYOL's first) is blurred in pieces of 16 images, whose
    passes stay in cache. On a CPU the vectorised schedule's 4x jitter work and blurring every
    example of a view whose blur probability is 0.1 cost more than the loop
    (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import tensorflow as tf

# The layout of a view's parameter vector.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = range(5, 9)  # the op of jitter round i: 0 brightness, 1 contrast, 2 saturation, 3 hue
GRAYSCALE, BLUR, SIGMA, SOLARIZE = range(9, 13)
NUM_PARAMS = 13
# BT.601 luma, tf.image.rgb_to_grayscale's.
LUMA = (0.2989, 0.5870, 0.1140)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL_FRACTION = 0.1


def _coin(seed, p):
  """1.0 with probability p from `seed` (static p = 0 / 1 draw nothing), as a float."""
  if p <= 0.0:
    return tf.constant(0.0)
  if p >= 1.0:
    return tf.constant(1.0)
  return tf.cast(tf.random.stateless_uniform([], seed=seed) < p, tf.float32)


def draw(seeds, cfg, view: int):
  """A view's colour parameters [NUM_PARAMS] from its six stage seeds `seeds` [6, 2] (2: jitter,
  3: grayscale, 4: blur, 5: solarize; 0 and 1 are the crop's and flip's): the coins and factors
  the per-example ops drew from the same seeds."""
  jitter = tf.random.experimental.stateless_split(seeds[2], num=6)
  blur = tf.random.experimental.stateless_split(seeds[4], num=2)

  def uniform(seed, low, high):
    return tf.random.stateless_uniform([], seed, low, high)

  order = tf.argsort(tf.random.stateless_uniform([4], jitter[5]))
  return tf.concat([
      tf.stack([_coin(jitter[0], cfg.jitter_prob),
                uniform(jitter[1], 1.0 - cfg.brightness, 1.0 + cfg.brightness),
                uniform(jitter[2], 1.0 - cfg.contrast, 1.0 + cfg.contrast),
                uniform(jitter[3], 1.0 - cfg.saturation, 1.0 + cfg.saturation),
                uniform(jitter[4], -cfg.hue, cfg.hue)]),
      tf.cast(order, tf.float32),
      tf.stack([_coin(seeds[3], cfg.grayscale_prob),
                _coin(blur[0], cfg.blur_prob[view]),
                uniform(blur[1], *BLUR_SIGMA),
                _coin(seeds[5], cfg.solarize_prob[view])])], axis=0)


def _clip(x):
  return tf.clip_by_value(x, 0.0, 1.0)


def brightness(rgb, factor):
  """Multiplicative, as torchvision's ColorJitter used by BYOL / NNCLR."""
  return tuple(_clip(c * factor) for c in rgb)


def contrast(rgb, factor):
  """tf.image.adjust_contrast: each channel pulled to or from its own mean over the image."""
  return tuple(_clip((c - m) * factor + m)
               for c in rgb for m in [tf.reduce_mean(c, axis=[-2, -1], keepdims=True)])


def _hue_waves(rgb, delta):
  """The hexcone of adjust_hue(delta) without a division: value V = max, chroma C = max - min,
  and each output channel's height above V - C, C x the hexcone's triangle wave (clipped to
  [0, 1]) of the shifted hue. The hue is kept as C x its sixths, [0, 6C): the sector formula
  times C (the sector's offset 0, 2C or 4C plus a difference of two channels), shifted by
  6 delta C and wrapped once (delta is first taken to [-0.5, 0.5], the same hue shift). A grey
  pixel (C = 0) has no height."""
  r, g, b = rgb
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  h = tf.where(v == r, g - b, tf.where(v == g, 2.0 * chroma + b - r, 4.0 * chroma + r - g))
  h = h + (6.0 * (delta - tf.round(delta))) * chroma
  h = tf.where(h < 0.0, h + 6.0 * chroma, tf.where(h >= 6.0 * chroma, h - 6.0 * chroma, h))
  waves = (tf.abs(h - 3.0 * chroma) - chroma, 2.0 * chroma - tf.abs(h - 2.0 * chroma),
           2.0 * chroma - tf.abs(h - 4.0 * chroma))
  return v, chroma, tuple(tf.clip_by_value(w, 0.0, chroma) for w in waves)


def saturation_hue(rgb, factor, delta):
  """tf.image.adjust_saturation(factor) and adjust_hue(delta) (they commute: one scales S, the
  other shifts H, of the same HSV pixel), in closed form on the hexcone (_hue_waves): S x factor
  clamped to 1 is chroma min(C x factor, V), which scales each channel's height by the same
  ratio."""
  v, chroma, waves = _hue_waves(rgb, delta)
  scaled = tf.minimum(chroma * factor, v)
  ratio = tf.math.divide_no_nan(scaled, chroma)
  return tuple(_clip(v - scaled + ratio * w) for w in waves)


def hue(rgb, delta):
  """saturation_hue(rgb, 1, delta), the same values (its ratio is exactly 1) without the
  saturation's division."""
  v, chroma, waves = _hue_waves(rgb, delta)
  return tuple(_clip(v - chroma + w) for w in waves)


def saturation(rgb, factor):
  """saturation_hue(rgb, factor, 0) without the hexcone: the hue is kept by keeping each
  channel's place between V and V - C, so scaling the chroma from C to min(C x factor, V) moves
  every channel toward (or from) V by the same ratio."""
  v = tf.maximum(tf.maximum(rgb[0], rgb[1]), rgb[2])
  chroma = v - tf.minimum(tf.minimum(rgb[0], rgb[1]), rgb[2])
  ratio = tf.math.divide_no_nan(tf.minimum(chroma * factor, v), chroma)
  return tuple(_clip(v - (v - c) * ratio) for c in rgb)


def grayscale(rgb):
  y = LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]
  return (y, y, y)


def solarize(rgb, threshold=0.5):
  return tuple(tf.where(c < threshold, c, 1.0 - c) for c in rgb)


def blur_radius(size):
  """The blur kernel's half width: 10% of the image side (BYOL: 23 taps at 224 px), cut at 4
  sigma (scipy.ndimage.gaussian_filter's default truncation): at 224 px, the 3 outer taps on
  each side hold under 2e-5 of the kernel at sigma 2, so leaving them out moves no pixel by
  more than 4e-5 (1% of a level) and saves a quarter of the convolution."""
  return max(1, min(int(size * BLUR_KERNEL_FRACTION) // 2, math.ceil(4 * BLUR_SIGMA[1])))


def _blurred_rows(rows, sigma, size, width):
  """The unclipped blur of n images as rows [n, S * W * 3] (each image's pixels flat), in the
  same layout. The rows are turned into channels ([1, S, W, 3n], by a 2-D transpose: 0.08 ms
  an image at 224 px on a CPU, against 0.2 for the 4-D one that keeps each pixel's 3 channels
  together), so one depthwise convolution per direction gives each image's channels its own
  kernel."""
  n = tf.shape(rows)[0]
  radius = blur_radius(size)
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma[:, tf.newaxis])))
  kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # [n, K]
  kernel = tf.tile(tf.transpose(kernel), [1, 3])  # [K, 3n]: channel c * n + image
  x = tf.reshape(tf.transpose(rows), [1, size, width, -1])
  x = tf.nn.depthwise_conv2d(x, kernel[tf.newaxis, :, :, tf.newaxis], [1, 1, 1, 1], "SAME")
  x = tf.nn.depthwise_conv2d(x, kernel[:, tf.newaxis, :, tf.newaxis], [1, 1, 1, 1], "SAME")
  return tf.transpose(tf.reshape(x, [-1, n]))


def _rows(images):
  return tf.reshape(images, [tf.shape(images)[0], -1])


def blur(images, sigma):
  """Separable Gaussian blur of float [n, S, S, 3] with one sigma per image [n], zero padded
  ("SAME")."""
  size, width = images.shape[1:3]
  return _clip(tf.reshape(_blurred_rows(_rows(images), sigma, size, width), tf.shape(images)))


# The host blurs a view whose every example is blurred in pieces of consecutive images, a
# multiple of 16 (48 channels: oneDNN's depthwise convolution runs whole AVX-512 vectors of
# channels) under this many bytes: each piece's passes (transposes, two convolutions) then stay
# in the cache. At 224 px, one core, with the clip: pieces of 16 images 0.30-0.32 ms an image,
# 8: 0.33, 32: 0.37, the whole batch of 64: 0.39; 17 or 21 (51 or 63 channels): 0.40.
BLUR_PIECE_BYTES = 10 << 20


def _blurred_pieces(images, sigma):
  """blur's unclipped rows of every image, as a list of pieces of consecutive images."""
  n, size, width = images.shape[:3]
  rows = _rows(images)
  if n is None:  # an unknown batch is one piece
    return [_blurred_rows(rows, sigma, size, width)]
  piece = max(16, BLUR_PIECE_BYTES // (size * width * 3 * 4) // 16 * 16)
  return [_blurred_rows(rows[i:i + piece], sigma[i:i + piece], size, width)
          for i in range(0, n, piece)]


def _planes(x):
  return (x[..., 0], x[..., 1], x[..., 2])


def _per_example(params, i):
  return params[:, i][:, tf.newaxis, tf.newaxis]


def _jitter_round(rgb, params, i):
  """Jitter round i of every example, each with the op its order names: all four computed,
  the named one kept (saturation and hue are one op with the other's identity factor)."""
  op = _per_example(params, ORDER[i])
  out = tuple(tf.where(op == 0, a, c) for a, c in zip(
      brightness(rgb, _per_example(params, BRIGHTNESS)), rgb))
  out = tuple(tf.where(op == 1, a, c) for a, c in zip(
      contrast(out, _per_example(params, CONTRAST)), out))
  return saturation_hue(out, tf.where(op == 2, _per_example(params, SATURATION), 1.0),
                        tf.where(op == 3, _per_example(params, HUE), 0.0))


def _jitter_one(rgb, p):
  """The four jitter rounds of one example ([1, S, S] planes, p [NUM_PARAMS]), each op computed
  only where its order names it."""
  def ops(x):
    f = lambda i: p[i]
    return [lambda: brightness(x, f(BRIGHTNESS)), lambda: contrast(x, f(CONTRAST)),
            lambda: saturation(x, f(SATURATION)),
            lambda: hue(x, f(HUE))]

  for i in range(4):
    rgb = tf.switch_case(tf.cast(p[ORDER[i]], tf.int32), ops(rgb))
  return rgb


def _where(on, new, old):
  return tuple(tf.where(on, a, b) for a, b in zip(new, old))


def _if_any(on, fn, rgb):
  """fn(rgb) kept where `on` [B, 1, 1]; skipped when no example needs it."""
  return tf.cond(tf.reduce_any(on), lambda: _where(on, fn(rgb), rgb), lambda: rgb)


ALL_STAGES = ("jitter", "grayscale", "blur", "solarize")


def stages_of(cfg, view: int) -> tuple:
  """The stages a view of `cfg` can use: a static probability 0 leaves its stage out of `apply`
  (no pass over the images for it)."""
  probs = {"jitter": cfg.jitter_prob, "grayscale": cfg.grayscale_prob,
           "blur": cfg.blur_prob[view], "solarize": cfg.solarize_prob[view]}
  return tuple(name for name in ALL_STAGES if probs[name] > 0)


def colour_jitter_grayscale(images, params, schedule="vectorised", stages=ALL_STAGES):
  """The jitter and grayscale stages of `apply` (the part before the blur), float32."""
  if "jitter" in stages and schedule == "host":
    # One example at a time from its uint8 crop to its float output, so that every pass over
    # it stays in the core's cache: 30% faster than looping over planes of the whole batch.
    def one(args):
      image, p = args
      rgb = tuple(c[tf.newaxis] for c in _planes(tf.image.convert_image_dtype(image, tf.float32)))
      rgb = tf.cond(p[JITTER] > 0, lambda: _jitter_one(rgb, p), lambda: rgb)
      if "grayscale" in stages:
        # A skip, not a select: XLA computes a select's both sides (0.17 against 0.07 ms an
        # image at 224 px when no example is greyed).
        rgb = tf.cond(p[GRAYSCALE] > 0, lambda: grayscale(rgb), lambda: rgb)
      return tf.stack([c[0] for c in rgb], axis=-1)

    return tf.map_fn(one, (images, params), fn_output_signature=tf.float32)
  x = tf.image.convert_image_dtype(images, tf.float32)
  if "jitter" not in stages and "grayscale" not in stages:
    return x
  rgb = _planes(x)
  if "jitter" in stages:
    def jitter(c):
      for i in range(4):
        c = _jitter_round(c, params, i)
      return c
    rgb = _if_any(_per_example(params, JITTER) > 0, jitter, rgb)
  if "grayscale" in stages:
    # A select, not a skip: under XLA it fuses into the one write of the output.
    rgb = _where(_per_example(params, GRAYSCALE) > 0, grayscale(rgb), rgb)
  return tf.stack(rgb, axis=-1)


def blur_and_solarize(x, params, schedule="vectorised", stages=ALL_STAGES):
  """The blur and solarize stages of `apply`, on colour_jitter_grayscale's output. The host
  schedule blurs only the examples whose coin says so (when every example is, in pieces:
  _blurred_pieces) and joins or selects the blurred images into the view, clipped and
  solarized, in one XLA pass."""
  on = params[:, BLUR] > 0
  solarize = "solarize" in stages
  if schedule == "host":
    def solarized(y):
      return _solarize_xla(y, params) if solarize else y

    if "blur" not in stages:
      return solarized(x)
    which = tf.where(on)

    def every():
      return _joined_xla(_blurred_pieces(x, params[:, SIGMA]), params, solarize,
                        tuple(x.shape))

    def some():
      # The blurred examples' rows, padded with row 0 (_blur_rows_for), blurred, then selected
      # into the view with its clip and solarize in one XLA pass: TF's scatter would copy the
      # batch (0.11 ms an image at 224 px, against 0.04 for the pass).
      rows = tf.pad(which[:, 0], [[0, _blur_rows_for(tf.size(which), x.shape[0]) -
                                   tf.size(which)]])
      size, width = x.shape[1:3]
      blurred = _blurred_rows(tf.gather(_rows(x), rows), tf.gather(params[:, SIGMA], rows),
                              size, width)
      return _selected_xla(x, blurred, params, solarize)

    return tf.cond(tf.reduce_all(on), every,
                   lambda: tf.cond(tf.size(which) > 0, some, lambda: solarized(x)))
  if "blur" in stages:
    x = tf.cond(tf.reduce_any(on),
                lambda: tf.where(on[:, None, None, None], blur(x, params[:, SIGMA]), x),
                lambda: x)
  return _solarize(x, params) if solarize else x


def _solarize(x, params):
  on = params[:, SOLARIZE][:, None, None, None] > 0
  return tf.where(tf.logical_and(on, x >= 0.5), 1.0 - x, x)


def apply(images, params, schedule="vectorised", stages=ALL_STAGES):
  """The colour stage of a batch: uint8 or float [B, S, S, 3] and params [B, NUM_PARAMS] ->
  float32 [B, S, S, 3] in [0, 1]. Jitter (if the example's coin says), grayscale, blur,
  solarize, in that order, as the per-example path; `stages` (static) may leave some out."""
  x = colour_jitter_grayscale(images, params, schedule, stages)
  return tf.ensure_shape(blur_and_solarize(x, params, schedule, stages), images.shape)


# The host schedule's jitter and grayscale compiled with XLA, which fuses each op's passes over
# the image into one; its blur stays a TF op (oneDNN's depthwise convolution beats XLA's on a CPU).
_jitter_grayscale_xla = tf.function(
    lambda images, params, stages: colour_jitter_grayscale(images, params, "host", stages),
    jit_compile=True)


_solarize_xla = tf.function(_solarize, jit_compile=True)


def _joined(pieces, params, solarize, shape):
  """_blurred_pieces' pieces as the view of `shape` [n, S, S, 3]: joined, clipped and
  solarized in one pass."""
  y = _clip(tf.reshape(tf.concat(pieces, axis=0), [-1, *shape[1:]]))
  return _solarize(y, params) if solarize else y


_joined_xla = tf.function(_joined, jit_compile=True)


def _blur_rows_for(m, n):
  """How many rows the host blurs for m examples of n: the least power of two >= m, at least 8
  (XLA compiles the pass that selects them back once per count, ~0.1 s on a CPU; 8, 16, 32 ...
  cover a batch of 64 at blur odds 0.1 in two, and a few spare rows cost less), at most n when
  n (static) is known."""
  powers = tf.bitwise.left_shift(1, tf.range(3, 31))
  p = tf.reduce_min(tf.where(powers >= m, powers, powers[-1]))
  return tf.minimum(p, n) if n is not None else p


def _selected(x, blurred, params, solarize):
  """The view from x [n, S, S, 3] and the unclipped blurred rows [>= m, S * S * 3] of its m
  examples whose coin says blur, in their order: each of those replaced by its blurred image,
  clipped, then solarized where the coin says, in one pass."""
  on = params[:, BLUR] > 0
  rank = tf.maximum(tf.cumsum(tf.cast(on, tf.int32)) - 1, 0)
  blurred = tf.reshape(blurred, [-1, *x.shape[1:]])
  y = tf.where(on[:, None, None, None], _clip(tf.gather(blurred, rank)), x)
  return _solarize(y, params) if solarize else y


_selected_xla = tf.function(_selected, jit_compile=True)


def apply_on_host(images, params, stages=ALL_STAGES):
  """`apply` as the host's tf.data runs it: the host schedule, all but the blur's convolution
  under XLA."""
  if "jitter" in stages or "grayscale" in stages:
    x = _jitter_grayscale_xla(images, params, tuple(stages))
  else:
    x = tf.image.convert_image_dtype(images, tf.float32)
  return tf.ensure_shape(blur_and_solarize(x, params, "host", stages), images.shape)
