import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from data_helpers import _take, _toy
from nnclr_tf import finetune, pipelines, sources
from nnclr_tf.config import AugmentConfig, DataConfig

AUG = AugmentConfig(blur_prob=(0.0, 0.0))


def test_digits_source_is_bundled_rgb():
  s = sources.digits_source()
  assert len(s) == 1797 and s.images.shape == (1797, 8, 8, 3) and s.images.dtype == np.uint8
  assert sorted(set(s.labels.tolist())) == list(range(10)) and s.has_labels


def test_split_balanced_is_class_balanced_and_seeded():
  s = _toy(100, classes=4)
  rest, held = sources.split_balanced(s, 22, seed=1)
  counts = np.bincount(held.labels, minlength=4)
  assert counts.sum() == 22 and counts.max() - counts.min() <= 1
  assert len(rest) == 78
  _, again = sources.split_balanced(s, 22, seed=1)
  np.testing.assert_array_equal(held.images, again.images)
  _, other = sources.split_balanced(s, 22, seed=2)
  assert not np.array_equal(held.images, other.images)
  with pytest.raises(sources.DataError):
    sources.split_balanced(s, 100, seed=0)


def test_validation_split_and_label_subsets_are_one_pinned_draw():
  # The index sets the two draws gave before they shared sources.balanced_indices (recorded from
  # the earlier split_balanced and finetune.label_subset): a change to the draw shows here.
  labels = np.arange(30, dtype=np.int32) % 3
  src = sources.Source(labels=labels, paths=np.arange(30))
  assert sources.split_balanced(src, 7, seed=0)[1].paths.tolist() == [7, 12, 14, 17, 18, 28, 29]
  assert sources.split_balanced(src, 5, seed=5)[1].paths.tolist() == [17, 18, 21, 23, 28]
  mixed = np.array([0, -1, 1, 2, -1, 0, 1, 2, 0, 1, -1, 2, 0, 1, 2, 0, -1, 1, 2, 0])
  assert finetune.label_subset(mixed, 0.5, seed=1).tolist() == [0, 3, 7, 8, 9, 13, 15, 17]
  assert finetune.label_subset(labels, 0.2, seed=3).tolist() == [13, 14, 17, 18, 22, 27]
  # Both are balanced_indices: over every index, or over the labelled ones only.
  too_few = lambda *a: "unused"
  np.testing.assert_array_equal(sources.balanced_indices(labels, 7, 0, too_few=too_few),
                                [7, 12, 14, 17, 18, 28, 29])
  np.testing.assert_array_equal(
      sources.balanced_indices(mixed, 8, 1, too_few=too_few, among=np.flatnonzero(mixed >= 0)),
      [0, 3, 7, 8, 9, 13, 15, 17])
  with pytest.raises(sources.DataError, match="^class 0: 11 asked, 10 there$"):
    sources.balanced_indices(labels, 33, 0, too_few=lambda c, want, have: (
        f"class {c}: {want} asked, {have} there"))


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
  s = sources.folder_source(str(tmp_path))
  assert s.class_names == ["cat", "dog"] and len(s) == 8
  # Not all 8 x 8: held as the files' bytes (decoded and cropped from the original in the
  # pipeline); at their own size (10 x 14 is not one), they would be held decoded.
  cached = sources.cache_decoded(s, 8, limit_mb=10)
  assert cached.images is None and cached.paths is None and cached.skipped == 1
  assert cached.encoded_images.shape == (7,) and cached.encoded
  assert list(np.bincount(cached.labels)) == [3, 4]
  batch = _take(pipelines.pretrain_dataset(cached, AUG, 8, 4, seed=0), 1)[0]
  assert batch["view1"].shape == (4, 8, 8, 3)
  assert sources.cache_decoded(s, 8, limit_mb=0).paths is not None  # does not fit
  os.makedirs(tmp_path / "native" / "x")
  for i in range(3):
    tf.io.write_file(str(tmp_path / "native" / "x" / f"{i}.png"),
                     tf.io.encode_png(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)))
  native = sources.cache_decoded(sources.folder_source(str(tmp_path / "native")), 8, 10)
  assert native.images.shape == (3, 8, 8, 3) and native.encoded_images is None


def test_the_cache_crops_from_the_original_like_the_files(tmp_path):
  """A folder of 300 x 450 JPEGs under the cache limit (held in memory) and over it (read from
  the files): the same seed gives the same crops, pixel for pixel within 1/255, at 64 px, and
  the same evaluation views."""
  rng = np.random.default_rng(1)
  for cls in ("a", "b"):
    os.makedirs(tmp_path / cls)
    for i in range(4):
      yy, xx = np.mgrid[:300, :450]
      img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, (300, 450))],
                     -1).astype(np.uint8)
      tf.io.write_file(str(tmp_path / cls / f"{i}.jpg"), tf.io.encode_jpeg(img, quality=95))
  files = sources.folder_source(str(tmp_path))
  held = sources.cache_decoded(files, 64, limit_mb=64)
  assert held.encoded_images is not None and held.paths is None
  lazy = sources.cache_decoded(files, 64, limit_mb=0)
  assert lazy.paths is not None
  aug = AugmentConfig(blur_prob=(0.0, 0.0), jitter_prob=0.0, grayscale_prob=0.0)
  a = _take(pipelines.pretrain_dataset(held, aug, 64, 8, seed=3), 2)
  b = _take(pipelines.pretrain_dataset(lazy, aug, 64, 8, seed=3), 2)
  for x, y in zip(a, b):
    for k in ("view1", "view2"):
      assert np.abs(x[k] - y[k]).max() <= 1 / 255 + 1e-6
  ev_a = next(iter(pipelines.eval_dataset(held, 64, 8, crop_fraction=0.875)))[0].numpy()
  ev_b = next(iter(pipelines.eval_dataset(lazy, 64, 8, crop_fraction=0.875)))[0].numpy()
  np.testing.assert_allclose(ev_a, ev_b, atol=1 / 255)


def test_folder_errors_name_the_flag(tmp_path):
  with pytest.raises(sources.DataError, match="--image_dir"):
    sources.folder_source(str(tmp_path / "missing"))
  with pytest.raises(sources.DataError, match="holds no images"):
    sources.folder_source(str(tmp_path))


def test_flat_folder_is_unlabelled(tmp_path):
  for i in range(3):
    tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(np.zeros((5, 5, 3), np.uint8)))
  s = sources.folder_source(str(tmp_path))
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
  train, held = sources.load_sources(cfg)
  assert len(train) == 24 and len(held) == 8 and train.class_names == ["dark", "bright"]
  # tfds reorders examples; the pixels must still go with their labels.
  np.testing.assert_array_equal(train.images.mean(axis=(1, 2, 3)) > 100, train.labels == 1)
  assert train.has_labels and np.bincount(train.labels).tolist() == [12, 12]
  # Over the cache limit the split is streamed through tfds instead of held in memory.
  stream, _ = sources.load_sources(DataConfig(dataset="tiny_stl", data_dir=tiny_stl,
                                              image_size=8, cache_limit_mb=0))
  assert isinstance(stream, sources.StreamSource) and len(stream) == 24 and stream.has_labels
  batch = _take(pipelines.pretrain_dataset(stream, AUG, 8, 4, seed=0), 1)[0]
  assert batch["view1"].shape == (4, 8, 8, 3) and set(batch["label"]) <= {0, 1}
  images, labels = next(iter(pipelines.eval_dataset(stream, 8, 32)))
  assert images.shape == (24, 8, 8, 3)
  np.testing.assert_array_equal(images.numpy().mean(axis=(1, 2, 3)) > 0.4, labels.numpy() == 1)
  # Held in memory at a crop fraction < 1, a split keeps the evaluation views the stream makes.
  cropped, _ = sources.load_sources(DataConfig(dataset="tiny_stl", data_dir=tiny_stl,
                                               image_size=8, eval_crop_fraction=0.5))
  assert cropped.eval_images.shape == (24, 8, 8, 3) and cropped.images.shape == (24, 8, 8, 3)
  views = [next(iter(pipelines.eval_dataset(s, 8, 32, 0.5)))[0].numpy() for s in (cropped, stream)]
  np.testing.assert_allclose(views[0], views[1], atol=0.5 / 255 + 1e-6)
  # At another training size the split is held as encoded bytes: the crop is cut from the
  # 8 x 8 original, as the stream cuts it (same views at image_size 12).
  encoded, _ = sources.load_sources(DataConfig(dataset="tiny_stl", data_dir=tiny_stl,
                                               image_size=12))
  assert encoded.images is None and encoded.encoded_images.shape == (24,)
  np.testing.assert_array_equal(encoded.labels, train.labels)  # the same tfds order
  views = [next(iter(pipelines.eval_dataset(s, 12, 32)))[0].numpy() for s in (encoded, stream)]
  np.testing.assert_allclose(views[0], views[1], atol=1 / 255)
  with pytest.raises(sources.DataError, match="not prepared"):
    sources.load_sources(DataConfig(dataset="tiny_stl", data_dir=str(tmp_path / "empty")))
  with pytest.raises(sources.DataError, match="not a tfds dataset"):
    sources.load_sources(DataConfig(dataset="no_such_dataset_xyz", data_dir=tiny_stl))


def test_tfds_split_expressions_and_knn_bank_split(tiny_stl):
  cfg = DataConfig(dataset="tiny_stl", data_dir=tiny_stl, image_size=8,
                   train_split="train+unlabelled", knn_train_split="train", eval_split="test")
  train, held = sources.load_sources(cfg)
  assert len(train) == 40 and len(held) == 8
  assert sorted(np.bincount(train.labels + 1).tolist()) == [12, 12, 16]  # -1, 0, 1
  assert not train.has_labels  # the unlabelled rows keep -1 (the online probe masks them)
  bank = sources.knn_bank_source(cfg, train)
  assert len(bank) == 24 and bank.has_labels and bank.name == "tiny_stl:train"
  np.testing.assert_array_equal(bank.images.mean(axis=(1, 2, 3)) > 100, bank.labels == 1)
  # Without --knn_train_split the bank is the training source itself.
  assert sources.knn_bank_source(dataclasses.replace(cfg, knn_train_split=""), train) is train
  half, _ = sources.load_sources(dataclasses.replace(cfg, train_split="train[:50%]"))
  assert len(half) == 12
  streamed, _ = sources.load_sources(dataclasses.replace(cfg, cache_limit_mb=0))
  assert isinstance(streamed, sources.StreamSource) and len(streamed) == 40
  labels = np.concatenate([b["label"] for b in _take(pipelines.pretrain_dataset(
      streamed, AUG, 8, 8, seed=0), 5)])
  assert set(labels.tolist()) == {-1, 0, 1}
  for bad in ("train+nope", "nope", "train[:abc]"):
    with pytest.raises(sources.DataError, match="fix --train_split"):
      sources.load_sources(dataclasses.replace(cfg, train_split=bad))


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
