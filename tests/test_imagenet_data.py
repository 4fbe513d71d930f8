"""The ImageNet-scale data path on a small synthetic ImageNet-shaped tfds dataset (JPEGs of
200-500 px, built locally in TFRecord and ArrayRecord form): decoding only the crop windows, and
resuming a streamed split at a step without replaying the stream."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from nnclr_tf import augment, data
from nnclr_tf.config import AugmentConfig, DataConfig

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import synthetic_imagenet  # noqa: E402

AUG = AugmentConfig()  # the full BYOL pipeline, blur included
SIZE = 32
TRAIN = 48  # 4 shards of 12


@pytest.fixture(scope="module", params=["tfrecord", "array_record"])
def stream(request, tmp_path_factory):
  root = str(tmp_path_factory.mktemp(request.param))
  synthetic_imagenet.build(root, TRAIN, 10, request.param)
  source, _ = data.load_sources(DataConfig(dataset=synthetic_imagenet.NAME, data_dir=root,
                                           image_size=SIZE, cache_limit_mb=0))
  assert isinstance(source, data.StreamSource)
  assert source.random_access == (request.param == "array_record")
  return source


def _np(batch):
  return {k: v.numpy() for k, v in batch.items()}


def _jpegs(n=3):
  rng = np.random.default_rng(0)
  return [tf.io.encode_jpeg(synthetic_imagenet.make_image(rng, i), quality=90) for i in range(n)]


def test_decoding_only_the_crop_windows_gives_the_full_decode_views():
  # The oracle is the pipeline before the fused path: decode whole, then crop.
  for i, jpeg in enumerate(_jpegs()):
    seed = tf.constant([7, i], tf.int64)
    want = augment.two_views(tf.io.decode_jpeg(jpeg, channels=3), seed, SIZE, AUG)
    got = data.two_views_encoded(jpeg, seed, SIZE, AUG, fused=True)
    whole = data.two_views_encoded(jpeg, seed, SIZE, AUG, fused=False)
    for w, g, h in zip(want, got, whole):
      np.testing.assert_allclose(h.numpy(), w.numpy(), atol=2e-6)
      # libjpeg upsamples chroma from the window's own blocks: within a level of the full
      # decode (up to the contrast jitter's gain), same pixels on average.
      np.testing.assert_allclose(g.numpy(), w.numpy(), atol=2 / 255)
      assert np.abs(g.numpy() - w.numpy()).mean() < 0.1 / 255


def test_crop_boxes_of_the_header_shape_are_the_decoded_images_boxes():
  for jpeg in _jpegs(2):
    decoded = tf.io.decode_jpeg(jpeg, channels=3)
    header = tf.concat([tf.image.extract_jpeg_shape(jpeg)[:2], [3]], 0)
    for s in range(5):
      seed = tf.constant([s, 1], tf.int64)
      a = augment.crop_window(tf.shape(decoded), seed)
      b = augment.crop_window(header, seed)
      assert [x.numpy().tolist() for x in a] == [x.numpy().tolist() for x in b]


def test_png_falls_back_to_a_full_decode():
  image = synthetic_imagenet.make_image(np.random.default_rng(1), 3, 40, 60)
  seed = tf.constant([3, 4], tf.int64)
  want = augment.two_views(tf.constant(image), seed, SIZE, AUG)
  got = data.two_views_encoded(tf.io.encode_png(image), seed, SIZE, AUG)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g.numpy(), w.numpy(), atol=2e-6)


@pytest.mark.slow
def test_resumed_stream_starts_at_the_contracts_batch(stream):
  batch, spe = 8, TRAIN // 8
  step = 2 * spe + 3  # in the 3rd epoch
  resumed = _np(next(iter(data.pretrain_dataset(stream, AUG, SIZE, batch, seed=4,
                                                start_step=step))))
  if stream.random_access:
    # The in-memory contract, computed here from the index function: row r of step s is example
    # index_shuffle(s * batch + r mod E) of epoch (s * batch + r) // E, with its example seed.
    records = stream.builder.as_data_source(split=stream.split)
    for r in range(batch):
      pos = step * batch + r
      epoch, within = divmod(pos, spe * batch)
      ex = int(tf.random.experimental.index_shuffle(
          tf.constant(within, tf.int64), tf.constant([4, epoch], tf.int64),
          tf.constant(TRAIN - 1, tf.int64)))
      raw = records.data_source[ex]
      image, label = stream.record_parser()(tf.constant(raw))
      views = data.two_views_encoded(image, augment.example_seed(4, epoch, ex), SIZE, AUG)
      assert resumed["label"][r] == label.numpy() == records[ex]["label"]
      # The stream colours the batch with XLA, the per-example views without: float rounding.
      np.testing.assert_allclose(resumed["view1"][r], views[0].numpy(), atol=1e-5)
      np.testing.assert_allclose(resumed["view2"][r], views[1].numpy(), atol=1e-5)
  # Either format: the resumed batch is the one an uninterrupted stream serves at that step.
  full = [_np(b) for b in data.pretrain_dataset(stream, AUG, SIZE, batch, seed=4).take(step + 1)]
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], full[step][k])
  # Each epoch serves every example once (labels are i mod 10 in generation order).
  for e in range(2):
    labels = np.concatenate([b["label"] for b in full[e * spe:(e + 1) * spe]])
    assert np.bincount(labels, minlength=10).tolist() == [5] * 8 + [4] * 2
  assert not np.array_equal(full[0]["label"], full[spe]["label"])  # a new order each epoch


def test_the_linear_protocols_view_of_a_jpeg_is_the_decoded_images():
  """--linear_protocol=sgd's one crop + flip view, decoding only the crop window, is the view of
  the decoded image (as the two pretraining views are)."""
  views = augment.crop_flip(AUG)
  for i, jpeg in enumerate(_jpegs()):
    seed = tf.constant([5, i], tf.int64)
    want = augment.augment_view(tf.io.decode_jpeg(jpeg, channels=3), seed, SIZE, views, 0)
    np.testing.assert_allclose(data.one_view_encoded(jpeg, seed, SIZE, views).numpy(),
                               want.numpy(), atol=2e-6)
    got = data.one_view_encoded(jpeg, seed, SIZE, views, fused=True).numpy()
    np.testing.assert_allclose(got, want.numpy(), atol=2 / 255)


@pytest.mark.slow
def test_linear_stream_follows_the_pretraining_order_and_resumes(stream):
  """The SGD linear protocol's stream of a streamed split: the pretraining stream's examples at
  every step (its labels), one view each, and resumed at a step it serves that step's batch."""
  batch, step = 8, 2 * (TRAIN // 8) + 3
  full = list(data.linear_dataset(stream, AUG, SIZE, batch, seed=4).take(step + 1))
  pre = list(data.pretrain_dataset(stream, AUG, SIZE, batch, seed=4).take(step + 1))
  for (images, labels), p in zip(full, pre):
    assert images.shape == (batch, SIZE, SIZE, 3)
    np.testing.assert_array_equal(labels.numpy(), p["label"].numpy())
  images, labels = next(iter(data.linear_dataset(stream, AUG, SIZE, batch, seed=4,
                                                 start_step=step)))
  np.testing.assert_array_equal(images.numpy(), full[step][0].numpy())
  np.testing.assert_array_equal(labels.numpy(), full[step][1].numpy())
