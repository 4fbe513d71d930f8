import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import data
from nnclr_tf.config import AugmentConfig, DataConfig
from nnclr_tf.model_config import NNCLRConfig

AUG = AugmentConfig(blur_prob=(0.0, 0.0))


def _toy(n=40, size=12, classes=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
  return data.numpy_source(images, np.arange(n) % classes)


def _take(ds, k):
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(k)]


def test_digits_source_is_bundled_rgb():
  s = data.digits_source()
  assert len(s) == 1797 and s.images.shape == (1797, 8, 8, 3) and s.images.dtype == np.uint8
  assert sorted(set(s.labels.tolist())) == list(range(10)) and s.has_labels


def test_split_balanced_is_class_balanced_and_seeded():
  s = _toy(100, classes=4)
  rest, held = data.split_balanced(s, 22, seed=1)
  counts = np.bincount(held.labels, minlength=4)
  assert counts.sum() == 22 and counts.max() - counts.min() <= 1
  assert len(rest) == 78
  _, again = data.split_balanced(s, 22, seed=1)
  np.testing.assert_array_equal(held.images, again.images)
  _, other = data.split_balanced(s, 22, seed=2)
  assert not np.array_equal(held.images, other.images)
  with pytest.raises(data.DataError):
    data.split_balanced(s, 100, seed=0)


@pytest.mark.slow
def test_same_seed_gives_identical_batches_twice():
  s = _toy()
  a = _take(data.pretrain_dataset(s, AUG, 8, 8, seed=5), 3)
  b = _take(data.pretrain_dataset(s, AUG, 8, 8, seed=5), 3)
  c = _take(data.pretrain_dataset(s, AUG, 8, 8, seed=6), 1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["view1"], c[0]["view1"])
  assert a[0]["view1"].shape == (8, 8, 8, 3) and a[0]["label"].dtype == np.int32


@pytest.mark.slow
def test_epoch_is_a_permutation_and_resume_matches():
  s = _toy(40)
  ds = data.pretrain_dataset(s, AUG, 8, 10, seed=1)
  batches = _take(ds, 8)
  # One epoch = 4 steps of 10: every example's label appears exactly its class count (10 each).
  epoch_labels = np.concatenate([b["label"] for b in batches[:4]])
  np.testing.assert_array_equal(np.bincount(epoch_labels), [10, 10, 10, 10])
  # The next epoch is shuffled differently.
  assert not np.array_equal(epoch_labels, np.concatenate([b["label"] for b in batches[4:]]))
  # Starting at step 5 yields exactly batches 5.. of the uninterrupted stream.
  resumed = _take(data.pretrain_dataset(s, AUG, 8, 10, seed=1, start_step=5), 2)
  for x, y in zip(resumed, batches[5:7]):
    np.testing.assert_array_equal(x["view1"], y["view1"])


@pytest.mark.slow
def test_global_batch_does_not_depend_on_replica_split():
  s = _toy(48)
  one = _take(data.pretrain_dataset(s, AUG, 8, 12, seed=3), 2)
  # Two workers with 2 replicas each: each pipeline yields its two replicas' 3-row batches.
  per_pipeline = []
  for pid in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                     num_replicas_in_sync=4)
    per_pipeline.append(_take(data.pretrain_dataset(s, AUG, 8, 12, seed=3, input_context=ctx), 4))
  for step in range(2):
    rows = [per_pipeline[pid][step * 2 + r]["view1"] for pid in range(2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(rows), one[step]["view1"])


def test_folder_source_labels_formats_and_cache(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("cat", "dog"):
    os.makedirs(tmp_path / cls)
    for i in range(3):
      img = rng.integers(0, 255, size=(10, 14, 3), dtype=np.uint8)
      enc = tf.io.encode_png(img) if i % 2 else tf.io.encode_jpeg(img)
      ext = "png" if i % 2 else "jpg"
      tf.io.write_file(str(tmp_path / cls / f"{i}.{ext}"), enc)
  # A grayscale PNG mixed in, and a corrupt file that must be skipped and counted.
  tf.io.write_file(str(tmp_path / "dog" / "gray.png"),
                   tf.io.encode_png(rng.integers(0, 255, (9, 9, 1), dtype=np.uint8)))
  (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
  s = data.folder_source(str(tmp_path))
  assert s.class_names == ["cat", "dog"] and len(s) == 8
  cached = data.cache_decoded(s, 8, limit_mb=10)
  assert cached.images.shape == (7, 8, 8, 3) and cached.skipped == 1
  assert list(np.bincount(cached.labels)) == [3, 4]
  batch = _take(data.pretrain_dataset(cached, AUG, 8, 4, seed=0), 1)[0]
  assert batch["view1"].shape == (4, 8, 8, 3)


def test_folder_errors_name_the_flag(tmp_path):
  with pytest.raises(data.DataError, match="--image_dir"):
    data.folder_source(str(tmp_path / "missing"))
  with pytest.raises(data.DataError, match="holds no images"):
    data.folder_source(str(tmp_path))


def test_flat_folder_is_unlabelled(tmp_path):
  for i in range(3):
    tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(np.zeros((5, 5, 3), np.uint8)))
  s = data.folder_source(str(tmp_path))
  assert len(s) == 3 and not s.has_labels


@pytest.fixture(scope="module")
def tiny_stl(tmp_path_factory):
  """A tfds dataset built on the spot (the real tfds read path), shaped like STL-10: labelled
  `train`, `unlabelled` (label -1) and `test`. Bright images are class 1 in every labelled split,
  so a label can be checked from the pixels."""
  import tensorflow_datasets as tfds

  class TinyStl(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(names=["dark", "bright"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(24, True),
              "unlabelled": self._generate_examples(16, False),
              "test": self._generate_examples(8, True)}

    def _generate_examples(self, n, labelled):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 3), 40 + 170 * (i % 2), np.uint8),
                  "label": i % 2 if labelled else -1}

  root = tmp_path_factory.mktemp("tfds")
  TinyStl(data_dir=str(root)).download_and_prepare()
  return str(root)


@pytest.mark.slow
def test_tfds_dataset_built_locally(tiny_stl, tmp_path):
  cfg = DataConfig(dataset="tiny_stl", data_dir=tiny_stl, image_size=8)
  train, held = data.load_sources(cfg)
  assert len(train) == 24 and len(held) == 8 and train.class_names == ["dark", "bright"]
  # tfds reorders examples; the pixels must still go with their labels.
  np.testing.assert_array_equal(train.images.mean(axis=(1, 2, 3)) > 100, train.labels == 1)
  assert train.has_labels and np.bincount(train.labels).tolist() == [12, 12]
  # Over the cache limit the split is streamed through tfds instead of held in memory.
  stream, _ = data.load_sources(DataConfig(dataset="tiny_stl", data_dir=tiny_stl,
                                           image_size=8, cache_limit_mb=0))
  assert isinstance(stream, data.StreamSource) and len(stream) == 24 and stream.has_labels
  batch = _take(data.pretrain_dataset(stream, AUG, 8, 4, seed=0), 1)[0]
  assert batch["view1"].shape == (4, 8, 8, 3) and set(batch["label"]) <= {0, 1}
  images, labels = next(iter(data.eval_dataset(stream, 8, 32)))
  assert images.shape == (24, 8, 8, 3)
  np.testing.assert_array_equal(images.numpy().mean(axis=(1, 2, 3)) > 0.4, labels.numpy() == 1)
  # Held in memory at a crop fraction < 1, a split keeps the evaluation views the stream makes.
  cropped, _ = data.load_sources(DataConfig(dataset="tiny_stl", data_dir=tiny_stl,
                                            image_size=8, eval_crop_fraction=0.5))
  assert cropped.eval_images.shape == (24, 8, 8, 3) and cropped.images.shape == (24, 8, 8, 3)
  views = [next(iter(data.eval_dataset(s, 8, 32, 0.5)))[0].numpy() for s in (cropped, stream)]
  np.testing.assert_allclose(views[0], views[1], atol=0.5 / 255 + 1e-6)
  with pytest.raises(data.DataError, match="not prepared"):
    data.load_sources(DataConfig(dataset="tiny_stl", data_dir=str(tmp_path / "empty")))
  with pytest.raises(data.DataError, match="not a tfds dataset"):
    data.load_sources(DataConfig(dataset="no_such_dataset_xyz", data_dir=tiny_stl))


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
  # through every path: cached in memory (uint8, so up to half a grey level), decoded lazily, both
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
  lazy = data.folder_source(str(tmp_path))
  cached = data.cache_decoded(lazy, 16, limit_mb=10, eval_crop_fraction=fraction)
  assert cached.images is not None and lazy.images is None
  originals = [raw[p] for p in lazy.paths]

  def oracle(img):
    (h, w), (t, l) = VIEW_BOXES[fraction][img.shape[:2]]
    x = tf.image.resize(img.astype(np.float32) / 255.0, [h, w], method="bilinear",
                        antialias=True).numpy()
    return np.clip(x[t:t + 16, l:l + 16], 0.0, 1.0)

  want = np.stack([oracle(img) for img in originals])
  as_float = lambda ds: np.concatenate([x.numpy() for x, _ in ds])
  from_files = as_float(data.eval_dataset(lazy, 16, crop_fraction=fraction))
  np.testing.assert_allclose(from_files, want, atol=1e-6)
  from_cache = as_float(data.eval_dataset(cached, 16, crop_fraction=fraction))
  np.testing.assert_allclose(from_cache, want, atol=0.5 / 255 + 1e-6)
  # Training still sees the whole image squashed to 16 x 16, whatever the evaluation view.
  squashed = data.cache_decoded(lazy, 16, limit_mb=10)
  np.testing.assert_array_equal(cached.images, squashed.images)
  if fraction != 1.0:
    with pytest.raises(data.DataError, match="without evaluation views"):
      data.eval_dataset(squashed, 16, crop_fraction=fraction)
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
  # Fine-tuning evaluates what it is handed through data.eval_dataset at its crop fraction.
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


def test_tfds_split_expressions_and_knn_bank_split(tiny_stl):
  cfg = DataConfig(dataset="tiny_stl", data_dir=tiny_stl, image_size=8,
                   train_split="train+unlabelled", knn_train_split="train", eval_split="test")
  train, held = data.load_sources(cfg)
  assert len(train) == 40 and len(held) == 8
  assert sorted(np.bincount(train.labels + 1).tolist()) == [12, 12, 16]  # -1, 0, 1
  assert not train.has_labels  # the unlabelled rows keep -1 (the online probe masks them)
  bank = data.knn_bank_source(cfg, train)
  assert len(bank) == 24 and bank.has_labels and bank.name == "tiny_stl:train"
  np.testing.assert_array_equal(bank.images.mean(axis=(1, 2, 3)) > 100, bank.labels == 1)
  # Without --knn_train_split the bank is the training source itself.
  assert data.knn_bank_source(dataclasses.replace(cfg, knn_train_split=""), train) is train
  half, _ = data.load_sources(dataclasses.replace(cfg, train_split="train[:50%]"))
  assert len(half) == 12
  streamed, _ = data.load_sources(dataclasses.replace(cfg, cache_limit_mb=0))
  assert isinstance(streamed, data.StreamSource) and len(streamed) == 40
  labels = np.concatenate([b["label"] for b in _take(data.pretrain_dataset(
      streamed, AUG, 8, 8, seed=0), 5)])
  assert set(labels.tolist()) == {-1, 0, 1}
  for bad in ("train+nope", "nope", "train[:abc]"):
    with pytest.raises(data.DataError, match="fix --train_split"):
      data.load_sources(dataclasses.replace(cfg, train_split=bad))


@pytest.mark.slow
def test_pretrain_on_partly_unlabelled_split_evaluates_on_labelled_bank(tiny_stl, tmp_path):
  from nnclr_tf import experiment
  from nnclr_tf.config import Experiment
  exp = Experiment.from_flagfile(
      "quickstart", model_dir=str(tmp_path / "m"), dataset="tiny_stl", data_dir=tiny_stl,
      image_size=8, val_images=0, train_split="train+unlabelled", knn_train_split="train",
      eval_split="test", width=8, proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16,
      batch_size=8, queue_size=64, train_steps=2, plots=False, knn_k=5, verbose=0)
  r = experiment.pretrain(exp)
  assert r["knn_bank_examples"] == 24 and r["eval_examples"] == 8 and 0 <= r["knn_top1"] <= 1
  assert r["online_probe_acc"] is not None  # sized from the labelled rows of train+unlabelled
  assert experiment.knn_eval(exp)["knn_bank_examples"] == 24
