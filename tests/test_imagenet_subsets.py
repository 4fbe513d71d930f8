"""--mode=finetune on ImageNet reads SimCLR's published subsets (tfds imagenet2012_subset/1pct,
/10pct), streamed from their files, on tiny local datasets in the real builders' layout.

The datasets are written by the real tfds builder classes (their name, version, features with the
1000 ImageNet classes, file layout), subclassed only to generate synthetic images instead of
reading the ILSVRC tars (and, for the subsets, SimCLR's image lists from the network): the code
under test opens them by name with `tfds.builder("imagenet2012_subset/10pct", data_dir)`, the real
builder. Each image's red level is flat and encodes its index, which survives JPEG, crop, resize
and flip, so a batch tells which files it was cut from.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder, imagenet_common
from tensorflow_datasets.datasets.imagenet2012_subset import imagenet2012_subset_dataset_builder

from nnclr_tf import data, experiment, finetune, pipelines
from nnclr_tf.config import AugmentConfig, Experiment, imagenet_subset
from nnclr_tf.errors import ConfigError, DataError
from run_helpers import run_cli

with open(imagenet_common.label_names_file()) as f:
  SYNSETS = f.read().split()[:4]
PER_CLASS = 10
# 40 training images, k-th of class c: index c * PER_CLASS + k.
TRAIN = [f"{SYNSETS[c]}_{k}.JPEG" for c in range(4) for k in range(PER_CLASS)]
# Not the first of each class, and not what a class-balanced draw of the fraction would take
# (4 images for 10% of 40): a fine-tune reading anything else fails the comparison.
SUBSETS = {"1pct": [f"{s}_5.JPEG" for s in SYNSETS],
           "10pct": [f"{s}_{k}.JPEG" for s in SYNSETS for k in (3, 8)]}
VALIDATION = [f"ILSVRC2012_val_{j:08d}.JPEG" for j in range(1, 9)]
ALL = TRAIN + VALIDATION  # image i has red level red(i)
SIZE = 16


def label_of(name):
  return SYNSETS.index(name.split("_")[0]) if name in TRAIN else VALIDATION.index(name) % 4


def red(index):
  return 10 + 5 * index


def jpeg(index):
  """Red level red(index) everywhere; green and blue ramps across and down, so that every crop
  and flip gives other pixels."""
  h, w = 20 + index % 5, 28 - index % 3  # not at --image_size: held encoded, cropped from these
  image = np.empty((h, w, 3), np.uint8)
  image[..., 0] = red(index)
  image[..., 1] = np.linspace(0, 255, w).round()[None, :]
  image[..., 2] = np.linspace(0, 255, h).round()[:, None]
  return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False).numpy()


def examples(names):
  for name in names:
    yield name, {"image": jpeg(ALL.index(name)), "label": label_of(name),
                 "file_name": name}


class LocalImagenet(imagenet2012_dataset_builder.Builder, skip_registration=True):
  name = "imagenet2012"
  # tfds finds a builder's metadata (description, citation) beside its module: the real one's.
  pkg_dir_path = imagenet2012_dataset_builder.Builder._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    return {"train": examples(TRAIN), "validation": examples(VALIDATION)}


class LocalImagenetSubset(imagenet2012_subset_dataset_builder.Builder, skip_registration=True):
  name = "imagenet2012_subset"
  pkg_dir_path = imagenet2012_subset_dataset_builder.Builder._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    return {"train": examples(SUBSETS[self.builder_config.name]),
            "validation": examples(VALIDATION)}


def build(root, file_format, subsets=("1pct", "10pct")):
  config = tfds.download.DownloadConfig(num_shards=4)
  LocalImagenet(data_dir=root, file_format=file_format).download_and_prepare(
      download_config=config)
  for name in subsets:
    LocalImagenetSubset(config=name, data_dir=root, file_format=file_format).download_and_prepare(
        download_config=config)
  return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """file format -> a data_dir holding imagenet2012 and both subsets in that format (built once)."""
  built = {}

  def root(file_format):
    if file_format not in built:
      built[file_format] = build(str(tmp_path_factory.mktemp(file_format)), file_format)
    return built[file_format]

  return root


def exp_for(data_dir, model_dir, **flags):
  return Experiment.from_flagfile(
      "quickstart", dataset="imagenet2012", data_dir=data_dir, train_split="train",
      eval_split="validation", val_images=0, image_size=SIZE, width=8, proj_hidden_dim=32,
      pred_hidden_dim=32, embedding_dim=16, batch_size=8, queue_size=64, finetune_init="random",
      finetune_batch_size=4, random_init_baseline=False, verbose=0,
      model_dir=model_dir, **flags)


def identities(batches):
  """(file names, labels) of the images of fine-tune batches, read from their red level."""
  names, labels = [], []
  for images, y in batches:
    for image, label in zip(images, y):
      level = image[..., 0].mean() * 255
      index = int(round((level - red(0)) / 5))
      # Levels are 5 apart and JPEG moves the mean red by up to 1.8 here: the nearest level.
      assert abs(level - red(index)) < 2.5
      names.append(ALL[index])
      labels.append(int(label))
  return names, labels


def subset_records(builder):
  """The examples of a subset's train split in file order, images as their JPEG bytes."""
  skip = {"image": tfds.decode.SkipDecoding()}
  if builder.info.file_format.value == "array_record":  # tfds reads these by index only
    return list(builder.as_data_source(split="train", decoders=skip))
  return list(builder.as_dataset(split="train", decoders=skip).as_numpy_iterator())


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_the_local_datasets_are_the_real_builders_layout(roots, file_format):
  builder = tfds.builder("imagenet2012_subset/10pct", data_dir=roots(file_format))
  assert type(builder).__module__ == imagenet2012_subset_dataset_builder.__name__  # tfds's own
  assert str(builder.version) == "5.0.0" and builder.info.features["label"].num_classes == 1000
  got = [ex["file_name"].decode() for ex in subset_records(builder)]
  assert sorted(got) == sorted(SUBSETS["10pct"])


@pytest.mark.parametrize("fraction,subset", [(0.1, "10pct"), (0.01, "1pct")])
def test_finetune_reads_exactly_the_published_subset_streamed(roots, tmp_path, monkeypatch,
                                                              fraction, subset):
  """The whole mode on TFRecord, the format `tfds build` writes by default (evaluation reads the
  validation split through tfds's as_dataset, which ArrayRecord splits do not have)."""
  root = roots("tfrecord")
  fed = []

  def spy(source, *args):
    fed.append((source, args))
    return pipelines.finetune_dataset(source, *args)

  monkeypatch.setattr(finetune, "train_dataset", spy)
  exp = exp_for(root, str(tmp_path), label_fraction=fraction)
  results = experiment.finetune(exp)
  ((source, args),) = fed
  assert isinstance(source, data.StreamSource) and source.streamed  # read from the files
  assert not hasattr(source, "images") and not hasattr(source, "encoded_images")
  assert source.name == f"imagenet2012_subset/{subset}:train"
  # Two passes over the stream model.fit read: each pass is every subset image once, labelled
  # as its file, and nothing from the other 40 - n training images.
  n = len(SUBSETS[subset])
  stream = pipelines.finetune_dataset(source, *args).unbatch().batch(n).take(2)
  for names, labels in (identities([b]) for b in stream.as_numpy_iterator()):
    assert sorted(names) == sorted(SUBSETS[subset])
    assert labels == [label_of(name) for name in names]
  assert results["subset"] == f"imagenet2012_subset/{subset}"
  assert results["labelled_examples"] == n and "labelled_per_class" not in results
  assert results["eval_examples"] == len(VALIDATION)
  # SimCLR's epochs, without the 300-step floor of small datasets: n // 4 steps each.
  assert results["epochs"] == (60 if subset == "1pct" else 30)
  assert results["steps"] == results["epochs"] * (n // 4)
  with open(os.path.join(str(tmp_path), "finetune_results.json")) as f:
    recorded = json.load(f)
  assert recorded["subset"] == f"imagenet2012_subset/{subset}"
  assert recorded["by_label_fraction"][f"{fraction:g}_random_init"]["subset"] == recorded["subset"]


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_the_streamed_subset_stream_is_the_subset_every_epoch(roots, file_format):
  source = data.imagenet_subset_source(exp_for(roots(file_format), "/unused").data, 0.1)
  assert source.streamed and source.random_access == (file_format == "array_record")
  n = len(SUBSETS["10pct"])
  stream = pipelines.finetune_dataset(source, SIZE, 4, 5, AugmentConfig()).unbatch().batch(n)
  epochs = [identities([b]) for b in stream.take(3).as_numpy_iterator()]
  for names, labels in epochs:
    assert sorted(names) == sorted(SUBSETS["10pct"])
    assert labels == [label_of(name) for name in names]
  assert len({tuple(names) for names, _ in epochs}) > 1  # a new order each epoch


def test_streamed_subset_by_index_gives_the_in_memory_batches(roots):
  """ArrayRecord: the streamed subset is read by index, so its batches are exactly those of the
  same records held in memory (the in-memory pipeline is the oracle)."""
  root = roots("array_record")
  streamed = data.imagenet_subset_source(exp_for(root, "/unused").data, 0.1)
  records = subset_records(tfds.builder("imagenet2012_subset/10pct", data_dir=root))
  held = data.Source(labels=np.array([r["label"] for r in records], np.int32),
                     encoded_images=np.array([r["image"] for r in records], object))
  assert streamed.random_access and not held.streamed
  aug = AugmentConfig()
  a = list(pipelines.finetune_dataset(streamed, SIZE, 4, 5, aug).take(6).as_numpy_iterator())
  b = list(pipelines.finetune_dataset(held, SIZE, 4, 5, aug).take(6).as_numpy_iterator())
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_allclose(xa, xb, atol=1e-6)


def test_other_datasets_keep_the_class_balanced_draw(tmp_path, monkeypatch):
  made, real = [], finetune.nesterov_sgd

  def spy(schedule, momentum, weight_decay, variables):
    made.append((momentum, weight_decay))
    return real(schedule, momentum, weight_decay, variables)

  monkeypatch.setattr(finetune, "nesterov_sgd", spy)
  exp = Experiment.from_flagfile("quickstart", model_dir=str(tmp_path), width=8,
                                 proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16,
                                 finetune_init="random", finetune_epochs=1, verbose=0,
                                 random_init_baseline=False, label_fraction=0.05,
                                 finetune_momentum=0.8, finetune_weight_decay=1e-4)
  results = experiment.finetune(exp)
  assert made == [(0.8, 1e-4)]  # the flags reach the optimizer
  assert results["subset"] == "class-balanced draw of digits, seed 0"
  assert results["labelled_per_class"] == [7, 8]  # 75 of the 1,500 training digits



def test_a_missing_subset_is_one_error_line(tmp_path, capsys):
  root = build(str(tmp_path / "data"), "tfrecord", subsets=("1pct",))
  flags = [f"--{k}={v}" for k, v in exp_for(root, str(tmp_path / "run")).flag_values().items()
           if k in ("dataset", "data_dir", "train_split", "eval_split", "val_images",
                    "image_size", "model_dir", "finetune_init")]
  code, lines, err = run_cli(capsys, "--mode=finetune", "--flagfile=flags/quickstart.cfg", *flags,
                          "--label_fraction=0.1")
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
  for needle in ("tfds imagenet2012_subset/10pct", f"--data_dir={root}",
                 f"tfds build imagenet2012_subset/10pct --data_dir={root} --manual_dir=",
                 "ILSVRC2012_img_train.tar"):
    assert needle in lines[0]
  assert not os.path.exists(tmp_path / "run" / "finetune_results.json")


def test_another_fraction_of_imagenet_is_refused_when_the_config_is_made(tmp_path, capsys):
  with pytest.raises(ConfigError, match=r"--label_fraction=0.05 with --dataset=imagenet2012.*"
                     r"use --label_fraction=0.01 or 0.1"):
    exp_for("/nowhere", str(tmp_path), label_fraction=0.05)
  code, lines, err = run_cli(capsys, "--mode=finetune", "--dataset=imagenet2012",
                          "--label_fraction=0.5", f"--model_dir={tmp_path}")
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert "published subsets" in lines[0]
  # Any fraction in (0, 1] elsewhere: our class-balanced draw.
  assert Experiment().replace(label_fraction=0.05).finetune.label_fraction == 0.05


def test_the_imagenet_preset_runs_simclrs_finetune():
  exp = Experiment.from_flagfile("imagenet_resnet50")
  f = exp.finetune
  assert imagenet_subset(exp.data.dataset, f.label_fraction) == "imagenet2012_subset/10pct"
  assert (f.batch_size, f.learning_rate * f.batch_size / 256, f.momentum, f.weight_decay) == (
      4096, 0.8, 0.9, 0.0)
  assert f.epochs == 0 and finetune.simclr_epochs(f.label_fraction) == 30
  one = exp.replace(label_fraction=0.01)
  assert imagenet_subset(one.data.dataset, 0.01) == "imagenet2012_subset/1pct"
  assert finetune.simclr_epochs(0.01) == 60
  assert (exp.augment.crop_scale, exp.augment.flip_prob, exp.data.eval_crop_fraction) == (
      (0.08, 1.0), 0.5, 0.875)


def test_a_subset_of_another_label_space_is_refused(roots, tmp_path, monkeypatch):
  """Labels are class indices: a subset whose names differ from imagenet2012's would be trained
  on wrong labels without a word."""
  real = data.imagenet_subset_source
  monkeypatch.setattr(data, "imagenet_subset_source", lambda *a: dataclasses.replace(
      real(*a), class_names=list(reversed(real(*a).class_names))))
  with pytest.raises(DataError, match="name different classes"):
    experiment.finetune(exp_for(roots("tfrecord"), str(tmp_path)))


def test_a_draw_from_a_streamed_split_is_one_error_line(roots):
  """Only ImageNet has published subsets; the draw elsewhere needs the labels in memory."""
  streamed = data.tfds_source("imagenet2012", "train", roots("tfrecord"), SIZE, 0)
  assert streamed.streamed
  with pytest.raises(DataError, match="is streamed .* raise --cache_limit_mb"):
    finetune.finetune(None, streamed, None, 1000, SIZE, AugmentConfig(), label_fraction=0.1)
