"""Data sources: the list of training examples and how each one is read.

A *source* holds decoded uint8 images in memory, or image files decoded on the fly, with integer
labels (-1 when unknown). Sources come from scikit-learn's bundled digits, a folder of images,
numpy arrays, or a tfds dataset (held in memory when it fits, else a StreamSource read from its
prepared files). The tf.data pipelines over them are in `nnclr_tf/pipelines.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from sklearn.datasets import load_digits
from tensorflow_datasets.core import constants as tfds_constants

from nnclr_tf import augment
from nnclr_tf.config import DataConfig, imagenet_subset
from nnclr_tf.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Source:
  """Training examples: `images` (uint8 [N, H, W, 3] in memory), `paths` (decoded lazily) or
  `encoded_images` (the files' bytes in memory, decoded lazily)."""
  labels: np.ndarray
  images: np.ndarray | None = None
  paths: np.ndarray | None = None
  encoded_images: np.ndarray | None = None
  class_names: list[str] = dataclasses.field(default_factory=list)
  name: str = ""
  skipped: int = 0  # unreadable files left out
  # Set by the in-memory caches of images stored at the training size: `images` are those
  # originals (cache_size x cache_size; images of any other size are held as `encoded_images`
  # instead, so no crop is ever cut from a resized copy). For an evaluation crop fraction < 1
  # the cache also keeps each image's evaluation view (uint8 [N, S, S, 3], augment.eval_transform
  # at `eval_crop_fraction`).
  cache_size: int = 0
  eval_images: np.ndarray | None = None
  eval_crop_fraction: float = 1.0

  def __len__(self):
    return len(self.labels)

  @property
  def has_labels(self):
    return bool(len(self.labels)) and bool(np.all(self.labels >= 0))

  # What the pipelines ask a source (StreamSource answers the same), instead of testing its class.
  random_access = True  # any example can be read by index
  streamed = False  # read through tfds from its prepared files, not a subset of rows

  @property
  def encoded(self):
    """Whether `reader(decode=False)` gives files' encoded bytes (decoded in the pipeline)."""
    return self.images is None

  def reader(self, decode=True):
    """index tensor -> (uint8 image [H, W, 3], int32 label). A file source with `decode` False
    gives the file's encoded bytes instead of the image, for a pipeline that decodes only the
    crop windows of a JPEG."""
    labels = tf.constant(self.labels, tf.int32)
    if self.images is not None:
      images = tf.constant(self.images)
      return lambda i: (tf.gather(images, i), tf.gather(labels, i))
    if self.encoded_images is not None:
      held = tf.constant(self.encoded_images, tf.string)
      fetch = lambda i: tf.gather(held, i)
    else:
      paths = tf.constant(self.paths)
      fetch = lambda i: tf.io.read_file(tf.gather(paths, i))

    def read(i):
      data = fetch(i)
      return decode_image(data) if decode else data, tf.gather(labels, i)

    return read

  def subset(self, idx, name=None):
    idx = np.asarray(idx)
    take = lambda a: None if a is None else a[idx]
    return Source(labels=self.labels[idx], images=take(self.images), paths=take(self.paths),
                  encoded_images=take(self.encoded_images), class_names=self.class_names,
                  name=name or self.name, skipped=self.skipped,
                  cache_size=self.cache_size, eval_images=take(self.eval_images),
                  eval_crop_fraction=self.eval_crop_fraction)


@dataclasses.dataclass
class StreamSource:
  """A tfds split too large to hold decoded in memory (e.g. imagenet2012), read from its files.

  Prepared as ArrayRecord (and `array_record` installed), its examples are read by index: the
  pretraining stream keeps the in-memory contract exactly (a pure function of (seed, step),
  whatever the number of workers) and a resumed run reads only the records of its first batch.
  Prepared as TFRecord, each input pipeline reads its own shards (file i goes to pipeline
  i mod pipelines) in an order drawn from (seed, epoch, pipeline), `shards_per_block` shards at a
  time, with their records in a seeded order within each block: the stream is a pure function of
  (seed, step, number of input pipelines), and a resume reads one block of raw records, without
  decoding, before its first batch.
  """
  builder: Any  # a tfds DatasetBuilder
  split: str
  num_examples: int
  class_names: list[str]
  labelled: bool
  name: str = ""
  skipped: int = 0
  shards_per_block: int = 4

  def __len__(self):
    return self.num_examples

  @property
  def has_labels(self):
    return self.labelled

  # The pipelines' questions (see Source): read through tfds, always as encoded bytes.
  streamed = True
  encoded = True

  @property
  def random_access(self):
    """Whether examples can be read by index (an ArrayRecord dataset, `array_record` installed)."""
    fmt = getattr(self.builder.info.file_format, "value", self.builder.info.file_format)
    return fmt == "array_record" and importlib.util.find_spec("array_record") is not None

  def record_parser(self):
    """serialized tfds example -> (encoded image bytes, int32 label or -1), nothing decoded."""
    features = self.builder.info.features

    def parse(record):
      ex = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
      label = tf.cast(ex["label"], tf.int32) if "label" in ex else tf.constant(-1, tf.int32)
      return ex["image"], label

    return parse

  def reader(self, decode=False):
    """int64 [b] example indices -> (encoded images [b], labels [b]) of an ArrayRecord split
    (`random_access`): a batch per call, so one Python call reads a batch of records. Images of
    different sizes do not stack, so they stay encoded."""
    if decode or not self.random_access:
      raise ValueError(f"{self.name} is read by index only as encoded bytes of ArrayRecord")
    records = self.builder.as_data_source(split=self.split).data_source
    parse = self.record_parser()

    def fetch(idx):
      return np.asarray(records.__getitems__([int(i) for i in idx]), dtype=object)

    def read(idx):
      raw = tf.numpy_function(fetch, [idx], tf.string, stateful=False)
      raw.set_shape(idx.shape)
      return tf.map_fn(parse, raw, fn_output_signature=(tf.string, tf.int32))

    return read


def numpy_source(images, labels=None, class_names=None, name="numpy"):
  """A source from arrays: images uint8 [N, H, W, C] (C = 1 or 3) or float in [0, 1]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f"images must have shape [N, H, W, 1|3], got {images.shape}")
  if images.dtype != np.uint8:
    images = np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  labels = np.full(len(images), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
  if len(labels) != len(images):
    raise DataError(f"{len(labels)} labels for {len(images)} images")
  return Source(labels=labels, images=images, class_names=list(class_names or []), name=name)


def digits_source():
  """scikit-learn's bundled 1,797 8x8 handwritten digits (no download), as RGB uint8."""
  d = load_digits()
  images = (d.images / 16.0 * 255.0).round().astype(np.uint8)
  return numpy_source(images, d.target, [str(i) for i in range(10)], name="digits")


def balanced_indices(labels, n, seed, *, too_few, among=None):
  """Sorted indices of a seeded draw of `n` of the indices `among` (default: all) with equal
  counts per class (±1, the classes that get one more drawn too): a function of the arguments
  only. The validation split and fine-tuning's label subsets both draw with it. A class with
  fewer examples than its share raises DataError(too_few(class, share, available)), worded by
  the caller for the flag that asked."""
  labels = np.asarray(labels)
  among = np.arange(len(labels)) if among is None else np.asarray(among)
  classes = np.unique(labels[among])
  rng = np.random.default_rng(seed)
  per_class = {c: rng.permutation(among[labels[among] == c]) for c in classes}
  take = {c: n // len(classes) for c in classes}
  for c in rng.permutation(classes)[: n % len(classes)]:
    take[c] += 1
  short = [c for c in classes if take[c] > len(per_class[c])]
  if short:
    raise DataError(too_few(short[0], take[short[0]], len(per_class[short[0]])))
  return np.sort(np.concatenate([per_class[c][: take[c]] for c in classes]))


def split_balanced(source, n, seed):
  """(rest, held_out): a seeded held-out set of `n` examples with equal counts per class (±1)."""
  if n <= 0:
    raise DataError("--val_images must be > 0 to carve a validation split")
  if n >= len(source):
    raise DataError(f"--val_images={n} must be smaller than the {len(source)} training images")
  held = balanced_indices(source.labels, n, seed, too_few=lambda c, *_: (
      f"--val_images={n} asks for more images of class {c} than it has"))
  rest = np.setdiff1d(np.arange(len(source)), held)
  return source.subset(rest), source.subset(held, name=source.name + "-val")


def bank_subset(source, n, seed):
  """A kNN bank of `n` of `source`'s images (all when n is 0 or not smaller): a seeded
  class-balanced draw of an in-memory or file source; the first n examples of a streamed tfds
  split (a tfds split slice: its labels are not in memory to balance by)."""
  if not n or n >= len(source):
    return source
  if source.streamed:
    return dataclasses.replace(source, split=f"{source.split}[:{n}]", num_examples=n,
                               name=f"{source.name}[:{n}]")
  idx = balanced_indices(source.labels, n, seed, too_few=lambda c, share, have: (
      f"--knn_monitor_bank={n} asks for {share} images of class {c}, which has {have}; "
      "lower it or use 0 (all)"))
  return source.subset(idx, name=f"{source.name} ({n} balanced)")


def folder_source(image_dir, flag="--image_dir"):
  """Images under `image_dir`: class sub-folders (labels from folder names) or a flat folder."""
  if not image_dir or not os.path.isdir(image_dir):
    raise DataError(f"{flag}={image_dir!r} is not a directory; point it at a folder of images")
  is_image = lambda f: f.lower().endswith(IMAGE_EXTENSIONS)
  subdirs = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
  paths: list[str] = []
  labels: list[int] = []
  names: list[str] = []
  for d in subdirs:
    files = sorted(f for f in os.listdir(os.path.join(image_dir, d)) if is_image(f))
    if files:
      labels += [len(names)] * len(files)
      paths += [os.path.join(image_dir, d, f) for f in files]
      names.append(d)
  if not paths:
    paths = [os.path.join(image_dir, f) for f in sorted(os.listdir(image_dir)) if is_image(f)]
    labels = [-1] * len(paths)
  if not paths:
    raise DataError(f"{flag}={image_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "put images in class sub-folders or directly in it")
  return Source(labels=np.asarray(labels, np.int32), paths=np.asarray(paths), class_names=names,
                name=os.path.basename(os.path.normpath(image_dir)))


def decode_image(data):
  """Encoded bytes (JPEG/PNG/GIF/BMP; gray, RGBA or palette) -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


# Off: in benchmarks/input_pipeline.py (224 px, ImageNet-shaped JPEGs, 2 cores) decoding the two
# crop windows separately was not faster than one full decode and two uint8 slices (92.7 vs 101.7
# pairs/s, benchmarks/RESULTS.md): the windows overlap and each re-reads the entropy-coded data.
def decode_error(path):
  """Why `path` cannot be decoded (one line), or None when it decodes."""
  try:
    decode_image(tf.io.read_file(path))
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, "message", str(e))
    # Eager errors carry a "{{function_node ...}} " prefix and an " [Op:...]" suffix.
    message = message.split("}} ")[-1].split(" [Op:")[0]
    return " ".join(message.split()) or type(e).__name__
  return None


def _drop_bad(source, good_idx, skip_bad):
  """The subset of `source` at `good_idx`; the others are undecodable files: counted and logged
  as skipped, or a DataError naming the first of them when `skip_bad` is False."""
  bad = np.setdiff1d(np.arange(len(source)), good_idx)
  if not len(bad):
    return source
  first = str(source.paths[bad[0]])
  reason = decode_error(first) or "unreadable"
  more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
  if len(bad) == len(source):
    raise DataError(f"none of the {len(source)} images in {source.name!r} could be decoded, "
                    f"e.g. {first}: {reason}; check the folder")
  if not skip_bad:
    raise DataError(f"{first}: cannot decode ({reason}){more}; remove or replace it, or pass "
                    "--skip_bad_images to leave unreadable images out")
  logging.warning("skipped %d unreadable image(s) in %s, e.g. %s: %s", len(bad), source.name,
                  first, reason)
  out = source.subset(good_idx)
  out.skipped = source.skipped + len(bad)
  return out


def _resize_uint8(image, size):
  """A decoded image resized for the in-memory cache (augment.resize, rounded back to uint8)."""
  resized = augment.resize(image[None], size)[0]
  return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def _cached_views(image, size, eval_crop_fraction):
  """What the in-memory cache keeps of a decoded uint8 image: the training-size image and, when
  the evaluation view is not that image (crop fraction < 1), the evaluation view in uint8."""
  views = [_resize_uint8(image, size)]
  if eval_crop_fraction < 1.0:
    view = augment.eval_transform(image, size, eval_crop_fraction)
    views.append(tf.cast(tf.round(view * 255.0), tf.uint8))
  return tuple(views)


def _cache_bytes(n, size, eval_crop_fraction):
  return n * size * size * 3 * (2 if eval_crop_fraction < 1.0 else 1)


def _set_cached(source, images, size, eval_crop_fraction):
  """`source` (modified) holding `images`, a list of per-batch view tuples of `_cached_views`."""
  source.images = np.concatenate([v[0] for v in images])
  source.cache_size, source.eval_crop_fraction = size, eval_crop_fraction
  if eval_crop_fraction < 1.0:
    source.eval_images = np.concatenate([v[1] for v in images])
  return source


def cache_decoded(source, size, limit_mb, skip_bad=True, eval_crop_fraction=1.0):
  """Holds a file source in memory when it fits `limit_mb`: decoded at size x size (with the
  evaluation views for `eval_crop_fraction` < 1, twice the memory) when every image is that
  size, else as the files' encoded bytes, so that the random crop is cut from the original as
  from the files (a squashed thumbnail would lose the aspect ratio and the pixels a small crop
  needs). Unreadable files are left out and counted in `skipped` (or raise a DataError when
  `skip_bad` is False). Returns the source unchanged when it does not fit."""
  if (source.images is not None or source.encoded_images is not None
      or _cache_bytes(len(source), size, eval_crop_fraction) > limit_mb * 2 ** 20):
    return source
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(source)), source.paths))

  def load(i, path):
    image = decode_image(tf.io.read_file(path))
    return i, tf.shape(image)[:2], _cached_views(image, size, eval_crop_fraction)

  ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors().batch(1024)
  chunks, images, native = [], [], True
  for i, hw, views in ds.as_numpy_iterator():
    chunks.append(i)
    images.append(views)
    native = native and bool(np.all(hw == size))
  idx = np.concatenate(chunks) if chunks else np.zeros([0], np.int64)
  out = _drop_bad(source, idx, skip_bad)
  if out is source:
    out = source.subset(idx)
  if not native:
    # The decode pass above checked every file; its resized views are not what the crop needs.
    if sum(os.path.getsize(p) for p in out.paths) > limit_mb * 2 ** 20:
      return out  # decoded lazily from the files
    # dtype=object: numpy's fixed-width bytes would strip a file's trailing zero bytes.
    out.encoded_images = np.array([_file_bytes(p) for p in out.paths], dtype=object)
    out.paths = None
    return out
  out.paths = None
  return _set_cached(out, images, size, eval_crop_fraction)


def _file_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def check_decodable(source, skip_bad=True):
  """For a source decoded lazily during training (too large to cache): decodes every file once up
  front, so that a corrupt file is skipped (and counted) or reported by name here instead of
  failing the input pipeline hours into training. Costs one decode pass over the folder."""
  if source.paths is None:
    return source
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(source)), source.paths))
  ds = ds.map(lambda i, path: (i, tf.shape(decode_image(tf.io.read_file(path)))[0]),
              num_parallel_calls=AUTOTUNE).ignore_errors().batch(4096)
  idx = [i for i, _ in ds.as_numpy_iterator()]
  return _drop_bad(source, np.concatenate(idx) if idx else np.zeros([0], np.int64), skip_bad)


def tfds_source(name, split, data_dir, size, limit_mb, eval_crop_fraction=1.0):
  """A tfds image dataset already prepared in `data_dir` (nothing is downloaded), in memory (as
  `cache_decoded` keeps it) when it fits `limit_mb`, else a StreamSource."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError for unknown names
    raise DataError(f"--dataset={name!r} is not a tfds dataset ({type(e).__name__}); use digits, "
                    "folder, or a name from `tfds.list_builders()`") from None
  if not builder.is_prepared():
    raise DataError(f"--dataset={name}: not prepared in --data_dir={data_dir!r} and this run does "
                    f"not download; run `tfds build {name} --data_dir=DIR` where there is network, "
                    "or use --dataset=folder")
  try:  # tfds reads split expressions: "train+unlabelled", "train[:10%]"
    n = builder.info.splits[split].num_examples
  except Exception as e:  # ValueError, KeyError or AssertionError depending on the expression
    raise DataError(f"split {split!r} of {name}: {e} (splits: "
                    f"{', '.join(builder.info.splits)}, combined as 'train+unlabelled' or sliced "
                    "as 'train[:10%]'); fix --train_split/--eval_split/--knn_train_split") from None
  features = builder.info.features
  has_label = "label" in features
  names = list(features["label"].names) if has_label else []
  if _cache_bytes(n, size, eval_crop_fraction) > limit_mb * 2 ** 20:
    return StreamSource(builder=builder, split=split, num_examples=n, class_names=names,
                        labelled=has_label, name=f"{name}:{split}")
  shape = tuple(features["image"].shape) if "image" in features else ()
  if shape[:2] != (size, size):
    # Not stored at the training size (or of varying size): hold the encoded bytes, so that the
    # random crop is cut from the original, as from the files, not from a squashed thumbnail.
    return _tfds_encoded(builder, split, names, limit_mb, f"{name}:{split}")
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def prep(ex):
    image, label = tfds_example(ex)
    return _cached_views(image, size, eval_crop_fraction), label

  images, labels = [], []
  for views, lb in ds.map(prep, num_parallel_calls=AUTOTUNE).batch(1024).as_numpy_iterator():
    images.append(views)
    labels.append(lb)
  out = Source(labels=np.concatenate(labels), class_names=names, name=f"{name}:{split}")
  return _set_cached(out, images, size, eval_crop_fraction)


def _tfds_encoded(builder, split, names, limit_mb, name):
  """A tfds split in memory as its images' encoded bytes (decoded lazily, like files), or the
  StreamSource when those exceed `limit_mb`."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  has_label = "label" in builder.info.features
  encoded, labels, total = [], [], 0
  for ex in ds.as_numpy_iterator():
    encoded.append(ex["image"])
    labels.append(ex["label"] if has_label else -1)
    total += len(ex["image"])
    if total > limit_mb * 2 ** 20:
      return StreamSource(builder=builder, split=split,
                          num_examples=builder.info.splits[split].num_examples,
                          class_names=names, labelled=has_label, name=name)
  # dtype=object: numpy's fixed-width bytes would strip trailing zero bytes.
  return Source(labels=np.asarray(labels, np.int32), encoded_images=np.array(encoded, object),
                class_names=names, name=name)


def tfds_example(ex):
  """A tfds example -> (uint8 [H, W, 3], int32 label or -1)."""
  image = ex["image"]
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  label = tf.cast(ex["label"], tf.int32) if "label" in ex else tf.constant(-1, tf.int32)
  return image, label


def load_sources(cfg: DataConfig, seed=0):
  """(train, eval or None) sources for a DataConfig."""
  if cfg.dataset == "digits":
    train, held = digits_source(), None
  elif cfg.dataset == "folder":
    def load(image_dir, flag):
      source = cache_decoded(folder_source(image_dir, flag), cfg.image_size, cfg.cache_limit_mb,
                             cfg.skip_bad_images, cfg.eval_crop_fraction)
      return check_decodable(source, cfg.skip_bad_images)  # no-op once cached
    train = load(cfg.image_dir, "--image_dir")
    held = load(cfg.eval_image_dir, "--eval_image_dir") if cfg.eval_image_dir else None
  else:
    train = tfds_source(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.image_size,
                        cfg.cache_limit_mb, cfg.eval_crop_fraction)
    held = None
    if cfg.eval_split:
      held = tfds_source(cfg.dataset, cfg.eval_split, cfg.data_dir, cfg.image_size,
                         cfg.cache_limit_mb, cfg.eval_crop_fraction)
  if cfg.val_images:
    if train.streamed:
      raise DataError(f"--val_images needs a dataset held in memory; {train.name} is streamed, "
                      "use --eval_split instead")
    if not train.has_labels:
      raise DataError("--val_images needs labelled training data (class sub-folders)")
    train, held = split_balanced(train, cfg.val_images, seed)
  return train, held


def imagenet_subset_source(cfg: DataConfig, label_fraction):
  """SimCLR's published `label_fraction` subset of ImageNet (config.imagenet_subset: tfds
  imagenet2012_subset/1pct or /10pct, prepared in --data_dir beside imagenet2012), whole, as a
  StreamSource whatever --cache_limit_mb: 10% is 128k images. A missing one is a DataError
  saying how to prepare it."""
  name = imagenet_subset(cfg.dataset, label_fraction)
  if name is None:
    raise DataError(f"--label_fraction={label_fraction:g} with --dataset={cfg.dataset} has no "
                    "published subset; use --label_fraction=0.01 or 0.1 with imagenet2012")
  where = cfg.data_dir or tfds_constants.DATA_DIR
  builder = tfds.builder(name, data_dir=cfg.data_dir)
  if not builder.is_prepared():
    raise DataError(
        f"--label_fraction={label_fraction:g} with --dataset={cfg.dataset} fine-tunes on "
        f"SimCLR's published subset, tfds {name}, which is not prepared in --data_dir={where}; "
        f"prepare it where there is network (it downloads SimCLR's image list) with "
        f"`tfds build {name} --data_dir={where} --manual_dir=DIR`, DIR holding "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar")
  features = builder.info.features
  return StreamSource(builder=builder, split="train",
                      num_examples=builder.info.splits["train"].num_examples,
                      class_names=list(features["label"].names), labelled=True,
                      name=f"{name}:train")


def knn_bank_source(cfg: DataConfig, train):
  """The labelled images kNN votes with and the supervised evaluations train on: the
  --knn_train_split of the tfds dataset, else the training source itself."""
  if not cfg.knn_train_split or cfg.knn_train_split == cfg.train_split:
    return train
  return tfds_source(cfg.dataset, cfg.knn_train_split, cfg.data_dir, cfg.image_size,
                     cfg.cache_limit_mb, cfg.eval_crop_fraction)


