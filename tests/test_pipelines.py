import os

import numpy as np
import pytest
import tensorflow as tf

from data_helpers import _take, _toy
from nnclr_tf import pipelines, sources
from nnclr_tf.config import AugmentConfig
from nnclr_tf.model_config import NNCLRConfig

AUG = AugmentConfig(blur_prob=(0.0, 0.0))


@pytest.mark.slow
def test_same_seed_gives_identical_batches_twice():
  s = _toy()
  a = _take(pipelines.pretrain_dataset(s, AUG, 8, 8, seed=5), 3)
  b = _take(pipelines.pretrain_dataset(s, AUG, 8, 8, seed=5), 3)
  c = _take(pipelines.pretrain_dataset(s, AUG, 8, 8, seed=6), 1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["view1"], c[0]["view1"])
  assert a[0]["view1"].shape == (8, 8, 8, 3) and a[0]["label"].dtype == np.int32


@pytest.mark.slow
def test_epoch_is_a_permutation_and_resume_matches():
  s = _toy(40)
  ds = pipelines.pretrain_dataset(s, AUG, 8, 10, seed=1)
  batches = _take(ds, 8)
  # One epoch = 4 steps of 10: every example's label appears exactly its class count (10 each).
  epoch_labels = np.concatenate([b["label"] for b in batches[:4]])
  np.testing.assert_array_equal(np.bincount(epoch_labels), [10, 10, 10, 10])
  # The next epoch is shuffled differently.
  assert not np.array_equal(epoch_labels, np.concatenate([b["label"] for b in batches[4:]]))
  # Starting at step 5 yields exactly batches 5.. of the uninterrupted stream.
  resumed = _take(pipelines.pretrain_dataset(s, AUG, 8, 10, seed=1, start_step=5), 2)
  for x, y in zip(resumed, batches[5:7]):
    np.testing.assert_array_equal(x["view1"], y["view1"])


@pytest.mark.slow
def test_global_batch_does_not_depend_on_replica_split():
  s = _toy(48)
  one = _take(pipelines.pretrain_dataset(s, AUG, 8, 12, seed=3), 2)
  # Two workers with 2 replicas each: each pipeline yields its two replicas' 3-row batches.
  per_pipeline = []
  for pid in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                     num_replicas_in_sync=4)
    ds = pipelines.pretrain_dataset(s, AUG, 8, 12, seed=3, input_context=ctx)
    per_pipeline.append(_take(ds, 4))
  for step in range(2):
    rows = [per_pipeline[pid][step * 2 + r]["view1"] for pid in range(2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(rows), one[step]["view1"])


class _PixelsOut:
  """Stands in for a model in export._Servable: its 'features' output is the preprocessed image."""
  config = NNCLRConfig(image_size=16)
  encoder = staticmethod(lambda x, training=False: tf.reshape(x, [tf.shape(x)[0], -1]))
  projector = staticmethod(lambda h, training=False: h)

  def portable_encoder(self):
    return self.encoder


# Hand-worked evaluation views at size 16 (see test_augment.EVAL_BOXES): (H, W) -> resized H, W
# and crop corner, per crop fraction.


VIEW_BOXES = {1.0: {(40, 25): ((16, 16), (0, 0)), (25, 40): ((16, 16), (0, 0))},
              0.875: {(40, 25): ((29, 18), (6, 1)), (25, 40): ((18, 29), (1, 6))}}


@pytest.mark.parametrize("fraction", [1.0, 0.875])
def test_cached_lazy_and_served_images_are_resized_alike(tmp_path, fraction, monkeypatch):
  # Non-square images larger than the training size give the network the same evaluation view
  # through every path: held in memory (as their encoded bytes), decoded lazily, both
  # signatures of the exported encoder, fine-tuning's evaluation and the plots' retrieval images.
  # The oracle: the hand-worked crop box of the antialiased bilinear resize.
  from nnclr_tf import export, finetune, plots
  rng = np.random.default_rng(3)
  raw = {}
  for cls, hw in (("a", (40, 25)), ("b", (25, 40))):
    os.makedirs(tmp_path / cls)
    for i in range(3):
      img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
      path = str(tmp_path / cls / f"{i}.png")
      tf.io.write_file(path, tf.io.encode_png(img))  # lossless
      raw[path] = img
  lazy = sources.folder_source(str(tmp_path))
  cached = sources.cache_decoded(lazy, 16, limit_mb=10, eval_crop_fraction=fraction)
  assert cached.encoded_images is not None and lazy.images is None
  originals = [raw[p] for p in lazy.paths]

  def oracle(img):
    (h, w), (t, l) = VIEW_BOXES[fraction][img.shape[:2]]
    x = tf.image.resize(img.astype(np.float32) / 255.0, [h, w], method="bilinear",
                        antialias=True).numpy()
    return np.clip(x[t:t + 16, l:l + 16], 0.0, 1.0)

  want = np.stack([oracle(img) for img in originals])
  as_float = lambda ds: np.concatenate([x.numpy() for x, _ in ds])
  from_files = as_float(pipelines.eval_dataset(lazy, 16, crop_fraction=fraction))
  np.testing.assert_allclose(from_files, want, atol=1e-6)
  from_cache = as_float(pipelines.eval_dataset(cached, 16, crop_fraction=fraction))
  np.testing.assert_allclose(from_cache, want, atol=1e-6)
  # serving_default takes a batch of one H, W; serve_image_bytes any mix of encoded sizes.
  for hw in ((40, 25), (25, 40)):
    rows = [k for k, img in enumerate(originals) if img.shape[:2] == hw]
    batch = tf.constant(np.stack([originals[k] for k in rows]))
    np.testing.assert_allclose(export.preprocess(batch, 16, fraction).numpy(), want[rows],
                               atol=1e-6)
  servable = export._Servable(_PixelsOut(), crop_fraction=fraction)
  pngs = tf.constant([tf.io.read_file(p).numpy() for p in lazy.paths])
  served = servable.serve_image_bytes(pngs)["features"].numpy().reshape(want.shape)
  np.testing.assert_allclose(served, want, atol=1e-6)
  rows = [k for k, img in enumerate(originals) if img.shape[:2] == (25, 40)]
  served = servable.serve_images(tf.constant(np.stack([originals[k] for k in rows])))
  np.testing.assert_allclose(served["features"].numpy().reshape(want[rows].shape), want[rows],
                             atol=1e-6)
  np.testing.assert_allclose(plots._images(lazy, [4, 0], 16, fraction), want[[4, 0]], atol=1e-6)
  # Fine-tuning evaluates what it is handed through pipelines.eval_dataset at its crop fraction.
  seen = []

  def recording(model, dataset):
    seen.append(as_float(dataset))
    return np.zeros((len(seen[-1]), 2), np.float32), np.zeros(len(seen[-1]), np.int32)

  monkeypatch.setattr(finetune, "extract_features", recording)
  import keras
  inputs = keras.Input((16, 16, 3))
  encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
  finetune.finetune(encoder, cached, lazy, 2, 16, AugmentConfig(), label_fraction=1.0, epochs=1,
                    batch_size=6, eval_crop_fraction=fraction)
  np.testing.assert_allclose(seen[0], want, atol=1e-6)
  # The shrink is antialiased: a fine checkerboard averages to grey instead of aliasing. (At a
  # non-integer ratio: 40 -> 7 plain bilinear is up to 0.37 off grey; 40 -> 10 would be grey
  # either way, sampling exactly between two pixels.)
  board = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)
  small = export.preprocess(tf.constant(np.repeat(board[None, ..., None], 3, -1)), 7).numpy()
  assert np.abs(small - 0.5).max() < 0.05


def test_pretraining_and_finetuning_rows_are_the_seeded_shuffle_of_their_position():
  # The contract, written out: position p of a stream is example index_shuffle(p mod E,
  # [seed, p // E], n - 1), E = the positions in an epoch. Pretraining's epoch is whole steps
  # (4 x 10 of the 42 examples), fine-tuning's is every example. The labels are the indices.
  n, seed = 42, 7
  src = sources.numpy_source(np.zeros((n, 8, 8, 3), np.uint8), np.arange(n))

  def contract(positions, epoch_len):
    return [int(tf.random.experimental.index_shuffle(
        tf.constant(p % epoch_len, tf.int64), tf.constant([seed, p // epoch_len], tf.int64),
        tf.constant(n - 1, tf.int64))) for p in positions]

  pre = _take(pipelines.pretrain_dataset(src, AUG, 8, 10, seed=seed), 9)
  assert np.concatenate([b["label"] for b in pre]).tolist() == contract(range(90), 40)
  resumed = _take(pipelines.pretrain_dataset(src, AUG, 8, 10, seed=seed, start_step=7), 1)
  assert resumed[0]["label"].tolist() == contract(range(70, 80), 40)
  aug = AugmentConfig(crop=False, flip_prob=0.0)
  fine = _take(pipelines.finetune_dataset(src, 8, 6, seed=seed, aug=aug), 15)
  assert np.concatenate([y for _, y in fine]).tolist() == contract(range(90), n)
