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
tests/oracles.py keeps the per-example path as the oracle.

Two schedules give the same views (tests/test_colour.py):
  vectorised (default): each jitter round computes the four ops for the whole batch and keeps,
    per example, the one its order names; blur is one depthwise convolution for the whole batch,
    kept where the coin says. Static shapes, no data-dependent control flow beyond skipping a
    stage no example uses: the accelerator schedule (`--augment_on=device`).
  host: a loop over examples takes each from its uint8 crop to its float jittered and greyed
    view (switching to the one op each jitter round needs; its passes stay in cache), and only
    the examples whose coin says blur are blurred (gathered, one depthwise convolution, scattered
    back). On a CPU the vectorised schedule's 4x jitter work and blurring every example of a view
    whose blur probability is 0.1 cost more than the loop (benchmarks/RESULTS.md).
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


def saturation_hue(rgb, factor, delta):
  """tf.image.adjust_saturation(factor) and adjust_hue(delta) (they commute: one scales S, the
  other shifts H, of the same HSV pixel), in closed form on the hexcone: value V = max, chroma
  C = max - min; S x factor clamped to 1 is chroma min(C x factor, V); the hue of the sector
  formula, shifted by delta mod 1; the channels back from the hexcone's triangle waves."""
  r, g, b = rgb
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  grey = chroma <= 0.0
  safe = tf.where(grey, 1.0, chroma)
  h6 = tf.where(v == r, (g - b) / safe, tf.where(v == g, 2.0 + (b - r) / safe,
                                                  4.0 + (r - g) / safe))
  h = h6 / 6.0 + delta
  h6 = 6.0 * (h - tf.floor(h))
  chroma = tf.minimum(chroma * factor, v)
  low = v - chroma
  waves = (tf.abs(h6 - 3.0) - 1.0, 2.0 - tf.abs(h6 - 2.0), 2.0 - tf.abs(h6 - 4.0))
  return tuple(tf.where(grey, c, _clip(low + chroma * _clip(w))) for c, w in zip(rgb, waves))


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


def _blurred_channels(images, sigma):
  """The unclipped blur of float [n, S, S, 3] as [S, S, n, 3]: the batch moved into the
  channels ([1, S, S, 3n]), so one depthwise convolution per direction gives each image's
  channels its own kernel."""
  n, size = tf.shape(images)[0], images.shape[1]
  radius = blur_radius(size)
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma[:, tf.newaxis])))
  kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # [n, K]
  kernel = tf.transpose(tf.repeat(kernel, 3, axis=0))  # [K, 3n]
  x = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, size, images.shape[2], -1])
  x = tf.nn.depthwise_conv2d(x, kernel[tf.newaxis, :, :, tf.newaxis], [1, 1, 1, 1], "SAME")
  x = tf.nn.depthwise_conv2d(x, kernel[:, tf.newaxis, :, tf.newaxis], [1, 1, 1, 1], "SAME")
  return tf.reshape(x, [size, images.shape[2], n, 3])


def _from_channels(y):
  return _clip(tf.transpose(y, [2, 0, 1, 3]))


def blur(images, sigma):
  """Separable Gaussian blur of float [n, S, S, 3] with one sigma per image [n], zero padded
  ("SAME")."""
  return _from_channels(_blurred_channels(images, sigma))


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
            lambda: saturation_hue(x, 1.0, f(HUE))]

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
        rgb = _where(p[GRAYSCALE] > 0, grayscale(rgb), rgb)
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
  schedule blurs only the examples whose coin says so, and runs all but the convolution under
  XLA: when every example is blurred (BYOL's first view), the transpose back from the blur's
  layout, the clip and the solarize are one XLA pass (0.11 ms an image at 224 px against 0.28
  for TF's transpose and clip and a solarize pass)."""
  on = params[:, BLUR] > 0
  solarize = "solarize" in stages
  if schedule == "host":
    def solarized(y):
      return _solarize_xla(y, params) if solarize else y

    if "blur" not in stages:
      return solarized(x)
    which = tf.where(on)

    def every():
      return _from_channels_xla(_blurred_channels(x, params[:, SIGMA]), params, solarize)

    def some():
      return solarized(tf.tensor_scatter_nd_update(
          x, which, blur(tf.gather_nd(x, which), tf.gather_nd(params[:, SIGMA], which))))

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


_from_channels_xla = tf.function(
    lambda y, params, solarize: _solarize(_from_channels(y), params) if solarize
    else _from_channels(y), jit_compile=True)


def apply_on_host(images, params, stages=ALL_STAGES):
  """`apply` as the host's tf.data runs it: the host schedule, all but the blur's convolution
  under XLA."""
  if "jitter" in stages or "grayscale" in stages:
    x = _jitter_grayscale_xla(images, params, tuple(stages))
  else:
    x = tf.image.convert_image_dtype(images, tf.float32)
  return tf.ensure_shape(blur_and_solarize(x, params, "host", stages), images.shape)
