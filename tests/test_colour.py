"""The batched colour stage (nnclr_tf/colour.py) against the per-example path it replaced
(tests/colour_oracle.py), on real JPEGs, in both schedules, with and without XLA."""

import dataclasses
import glob
import os
import sys

import colour_oracle
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from nnclr_tf import augment, colour
from nnclr_tf.config import AugmentConfig

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import synthetic_imagenet  # noqa: E402

CIFAR = os.path.join(REPO, "..", "shared", "data", "cifar10", "train")
# The paper's odds, and odds of 0.5 everywhere so that every op meets every other in a batch.
CONFIGS = {"byol": AugmentConfig(),
           "even": AugmentConfig(jitter_prob=0.5, grayscale_prob=0.5, blur_prob=(0.5, 0.5),
                                 solarize_prob=(0.5, 0.5))}


def _jpegs(n=24):
  """Real photographs when the CIFAR-10 JPEGs are beside the checkout (CI has them), else
  ImageNet-shaped synthetic JPEGs: encoded bytes either way."""
  files = sorted(glob.glob(os.path.join(CIFAR, "*", "*.jpg")))[::997][:n]
  if len(files) == n:
    return [tf.io.read_file(f) for f in files]
  rng = np.random.default_rng(0)
  return [tf.io.encode_jpeg(synthetic_imagenet.make_image(rng, i, 40, 48)) for i in range(n)]


def _halves(cfg, size, n=24):
  """(uint8 views [n, S, S, 3], params [n, P], the views' seeds, view index) of both views of n
  JPEGs, as the pipeline makes them per example."""
  images, params, seeds, views = [], [], [], []
  for i, data in enumerate(_jpegs(n)):
    image = tf.io.decode_jpeg(data, channels=3)
    seed = tf.constant([11, i], tf.int64)
    read = augment.slicer(image)
    for v, (u8, p) in enumerate(augment.crop_views(tf.shape(image), read, seed, size, cfg)):
      images.append(u8)
      params.append(p)
      seeds.append(augment.split_seed(seed, 2)[v])
      views.append(v)
  return tf.stack(images), tf.stack(params), seeds, views


def _oracle(images, seeds, views, cfg):
  return np.stack([colour_oracle.colour_view(tf.cast(x, tf.float32) / 255.0, s, cfg, v).numpy()
                   for x, s, v in zip(images, seeds, views)])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("schedule", ["vectorised", "host"])
def test_the_batched_stage_makes_the_per_example_views(name, schedule):
  cfg = CONFIGS[name]
  images, params, seeds, views = _halves(cfg, 40)
  want = _oracle(images, seeds, views, cfg)
  for i, v in enumerate(views):  # the view index is in the params, not an argument
    np.testing.assert_array_equal(params[i].numpy(), colour.draw(
        augment.split_seed(seeds[i], 6), cfg, v).numpy())
  got = colour.apply(images, params, schedule).numpy()
  assert got.shape == want.shape and got.dtype == np.float32
  diff = np.abs(got - want)
  assert diff.max() <= 1 / 255, diff.max()
  assert diff.mean() < 1e-5, diff.mean()
  # Every stage ran on some views and not on others, so each coin was honoured both ways.
  p = params.numpy()
  for i in (colour.JITTER, colour.GRAYSCALE, colour.BLUR):
    assert 0 < p[:, i].sum() < len(p), i
  if name == "even":
    assert 0 < p[:, colour.SOLARIZE].sum() < len(p)


def test_the_schedules_agree_with_and_without_xla_and_a_view_does_not_depend_on_its_batch():
  cfg = CONFIGS["even"]
  images, params, _, _ = _halves(cfg, 32, 16)
  graph = colour.apply(images, params, "host").numpy()
  np.testing.assert_allclose(colour.apply_on_host(images, params).numpy(), graph, atol=2e-6)
  xla = tf.function(colour.apply, jit_compile=True)
  np.testing.assert_allclose(xla(images, params).numpy(), graph, atol=2e-6)
  for schedule in ("vectorised", "host"):
    # The 1-vs-N-replica contract: a replica's rows are made as in the whole batch.
    for lo, hi in ((0, 8), (8, 16), (5, 6)):
      np.testing.assert_allclose(colour.apply(images[lo:hi], params[lo:hi], schedule).numpy(),
                                 graph[lo:hi], atol=2e-6)


def test_the_host_path_when_every_view_is_blurred(monkeypatch):
  """BYOL's first view blurs every image: apply_on_host then blurs it in pieces of 16 images
  (here 16, 16 and 8) and joins, clips and solarizes them in one XLA pass, which must give
  apply's views (solarize on half the rows)."""
  monkeypatch.setattr(colour, "BLUR_PIECE_BYTES", 1)
  images, params, _, _ = _halves(CONFIGS["even"], 32, 20)
  assert [int(p.shape[0]) for p in colour._blurred_pieces(
      tf.cast(images, tf.float32), params[:, colour.SIGMA])] == [16, 16, 8]
  p = params.numpy()
  p[:, colour.BLUR] = 1.0
  p[:, colour.SOLARIZE] = np.arange(len(p)) % 2
  for stages in (colour.ALL_STAGES, ("jitter", "grayscale", "blur")):
    want = colour.apply(images, p, "vectorised", stages).numpy()
    np.testing.assert_allclose(colour.apply_on_host(images, p, stages).numpy(), want,
                               atol=2e-6)


def test_the_host_path_when_some_views_are_blurred():
  """The blurred examples are padded to a power of two, blurred, and selected back: for every
  count of them (1 to all but one, at odd places), apply_on_host gives apply's views."""
  images, params, _, _ = _halves(CONFIGS["even"], 32, 10)
  rng = np.random.default_rng(3)
  for m in range(1, len(images)):
    p = params.numpy()
    p[:, colour.BLUR] = 0.0
    p[rng.permutation(len(p))[:m], colour.BLUR] = 1.0
    want = colour.apply(images, p, "vectorised").numpy()
    np.testing.assert_allclose(colour.apply_on_host(images, p).numpy(), want, atol=2e-6,
                               err_msg=f"{m} blurred")


def test_the_rows_blurred_are_the_least_power_of_two_from_8():
  for n in (None, 6, 12, 64):
    for m in range(1, 70):
      want = max(8, 1 << (m - 1).bit_length())
      assert int(colour._blur_rows_for(tf.constant(m), n)) == (want if n is None
                                                                else min(want, n)), (m, n)


def test_the_blur_cut_at_four_sigma_is_the_full_kernel():
  """At 224 px the kernel is 17 taps, not the 23 of the 10% rule: against numpy's 23-tap
  separable blur (zero padded), no pixel moves by more than the dropped taps' mass."""
  assert colour.blur_radius(224) == 8 and colour.blur_radius(40) == 2
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 224, 224, 3)).astype(np.float32)
  x[:, 100:120, 100:120] = 1.0  # a bright square: an edge where the tails count
  sigma = np.array([2.0, 1.3], np.float32)
  want = np.empty_like(x, dtype=np.float64)
  taps = np.arange(-11, 12)
  for i, s in enumerate(sigma):
    k = np.exp(-taps ** 2 / (2.0 * float(s) ** 2))
    k /= k.sum()
    y = np.pad(x[i].astype(np.float64), ((11, 11), (11, 11), (0, 0)))
    y = sum(w * y[j:j + 224] for j, w in enumerate(k))  # down the columns: [224, 246, 3]
    want[i] = sum(w * y[:, j:j + 224] for j, w in enumerate(k))  # along the rows
  got = colour.blur(tf.constant(x), tf.constant(sigma)).numpy()
  assert np.abs(got - want).max() < 5e-5, np.abs(got - want).max()


def test_saturation_without_the_hexcone_is_tf_image_adjust_saturation():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(16, 16, 3)).astype(np.float32)
  x[0] = 0.3  # grey pixels (no chroma) and black ones stay as they are
  x[1] = 0.0
  rgb = tuple(tf.constant(x[..., c]) for c in range(3))
  for factor in (0.0, 0.2, 1.0, 1.8, 5.0):  # BYOL draws from [0.2, 1.8]; 5 clamps S at 1
    got = np.stack([c.numpy() for c in colour.saturation(rgb, factor)], -1)
    np.testing.assert_allclose(got, tf.image.adjust_saturation(x, factor).numpy(), atol=1e-5)


def test_hue_without_a_division_is_tf_image_adjust_hue():
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(32, 32, 3)).astype(np.float32)
  x[0] = 0.3  # grey and black pixels, and pixels with two channels at the max (sector edges)
  x[1] = 0.0
  x[2, :, :2] = 0.8
  x[3] = np.round(x[3] * 4) / 4
  rgb = tuple(tf.constant(x[..., c]) for c in range(3))
  stack = lambda planes: np.stack([c.numpy() for c in planes], -1)
  for delta in (-1.0, -0.5, -0.37, -0.1, 0.0, 0.05, 0.1, 0.5, 0.74, 1.0):
    want = tf.image.adjust_hue(x, delta).numpy()
    np.testing.assert_allclose(stack(colour.hue(rgb, delta)), want, atol=2e-6, err_msg=delta)
    np.testing.assert_array_equal(stack(colour.saturation_hue(rgb, 1.0, delta)),
                                  stack(colour.hue(rgb, delta)))
    for factor in (0.2, 1.8):
      np.testing.assert_allclose(
          stack(colour.saturation_hue(rgb, factor, delta)),
          tf.image.adjust_saturation(tf.image.adjust_hue(x, delta), factor).numpy(),
          atol=2e-6, err_msg=(delta, factor))


def test_a_coin_of_zero_or_one_draws_nothing_and_off_stages_leave_the_view_as_cropped():
  seeds = augment.split_seed(tf.constant([1, 2], tf.int64), 6)
  off = augment.crop_flip(AugmentConfig())
  p = colour.draw(seeds, off, 1).numpy()
  assert p[[colour.JITTER, colour.GRAYSCALE, colour.BLUR, colour.SOLARIZE]].tolist() == [0] * 4
  on = dataclasses.replace(off, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=(1.0, 1.0),
                           solarize_prob=(1.0, 1.0))
  p = colour.draw(seeds, on, 1).numpy()
  assert p[[colour.JITTER, colour.GRAYSCALE, colour.BLUR, colour.SOLARIZE]].tolist() == [1] * 4
  assert sorted(p[list(colour.ORDER)].tolist()) == [0, 1, 2, 3]
  u8 = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)), tf.uint8)
  both = tf.stack([colour.draw(seeds, off, 0)] * 2)
  np.testing.assert_allclose(colour.apply(u8, both).numpy(), u8.numpy() / 255, rtol=1e-6)


def test_the_ops_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 6, 6, 3)).astype(np.float32)
  rgb = tuple(tf.constant(x[..., c]) for c in range(3))
  stack = lambda planes: np.stack([c.numpy() for c in planes], -1)
  np.testing.assert_allclose(stack(colour.solarize(rgb)), np.where(x < 0.5, x, 1 - x))
  np.testing.assert_allclose(stack(colour.grayscale(rgb)),
                             np.repeat(x @ np.array(colour.LUMA, np.float32), 3).reshape(x.shape),
                             atol=1e-6)
  # Saturation x1 and a hue shift of a whole turn are the identity; saturation x0 is the grey
  # of the pixel's value (HSV: V = max).
  np.testing.assert_allclose(stack(colour.saturation_hue(rgb, 1.0, 0.0)), x, atol=1e-6)
  np.testing.assert_allclose(stack(colour.saturation_hue(rgb, 1.0, 1.0)), x, atol=1e-5)
  np.testing.assert_allclose(stack(colour.saturation_hue(rgb, 0.0, 0.0)),
                             np.repeat(x.max(-1), 3).reshape(x.shape), atol=1e-6)
  means = x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(stack(colour.contrast(rgb, 0.0)), np.broadcast_to(means, x.shape),
                             atol=1e-6)
  # A blur of a constant image keeps its inside; zero padding darkens the border.
  flat = tf.fill([1, 30, 30, 3], 0.5)
  blurred = colour.blur(flat, tf.constant([2.0])).numpy()
  np.testing.assert_allclose(blurred[0, 10:20, 10:20], 0.5, atol=1e-6)
  assert blurred[0, 0, 0, 0] < 0.5


COLOUR_ON = ["--jitter_prob=0.8", "--grayscale_prob=0.2", "--blur_prob=1.0,0.1",
             "--solarize_prob=0,0.2"]


@pytest.mark.slow
def test_augment_on_device_trains_as_the_host_does(tmp_path, record_property):
  """3 steps with the colour stage in the train step (uint8 crops and their parameters sent;
  on 1 replica under XLA, on 2 under MirroredStrategy) end where the host-coloured run does, up
  to cross-kernel rounding measured against what training changed (tolerances.py)."""
  from test_run import TINY, results, run

  import tolerances
  common = ["--flagfile=flags/quickstart.cfg", "--train_steps=3", "--seed=7",
            "--learning_rate=0.05", *COLOUR_ON, *TINY]
  out = {}
  for name, extra in [("host", []), ("device_xla", ["--augment_on=device", "--jit_compile"]),
                      ("device_2", ["--augment_on=device", "--cpu_replicas=2"])]:
    d = str(tmp_path / name)
    p = run([*common, f"--model_dir={d}", *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    out[name] = (results(d), tolerances.checkpoint(d))
  base_r, base = out["host"]
  init = tolerances.initial_checkpoint(str(tmp_path / "host"), str(tmp_path))
  for name in ("device_xla", "device_2"):
    r, ckpt = out[name]
    record_property(f"loss_gap_{name}", tolerances.loss_gap(base_r["final_loss"],
                                                            r["final_loss"]))
    tolerances.assert_loss_close(base_r["final_loss"], r["final_loss"])
    assert ckpt.keys() == base.keys()
    record_property(f"divergence_{name}", tolerances.divergence(init, base, ckpt))
    tolerances.assert_trained_close(init, base, ckpt)
  assert out["device_2"][0]["replicas"] == 2
