"""Data sources and tf.data pipelines.

A *source* is the list of training examples: decoded uint8 images held in memory, or image files
decoded on the fly, with integer labels (-1 when unknown). Sources come from scikit-learn's bundled
digits, a folder of images, numpy arrays, or a tfds dataset.

The pretraining pipeline is a pure function of (seed, global step): element `i` of the global stream
is example `index_shuffle(i mod E, seed, epoch)` of the epoch `i // E` (E = steps_per_epoch x global
batch), augmented with a seed derived from (seed, epoch, example index). Each input pipeline builds
only the rows of its own replicas, so the global batch of step s is the same whatever the number of
replicas or workers, and a run resumed at step s sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

import numpy as np
import tensorflow as tf

from nnclr_tf import augment
from nnclr_tf.config import AugmentConfig, DataConfig
from nnclr_tf.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Source:
  """Training examples: `images` (uint8 [N, H, W, 3] in memory) or `paths` (decoded lazily)."""
  labels: np.ndarray
  images: Optional[np.ndarray] = None
  paths: Optional[np.ndarray] = None
  class_names: List[str] = dataclasses.field(default_factory=list)
  name: str = ""
  skipped: int = 0  # unreadable files left out
  # Set by the in-memory caches: `images` were squashed to cache_size x cache_size, so their
  # aspect ratio is lost (0: `images` are the originals). For an evaluation crop fraction < 1 the
  # cache also keeps each original's evaluation view (uint8 [N, S, S, 3], augment.eval_transform
  # at `eval_crop_fraction`), which cannot be made from a squashed image.
  cache_size: int = 0
  eval_images: Optional[np.ndarray] = None
  eval_crop_fraction: float = 1.0

  def __len__(self):
    return len(self.labels)

  @property
  def has_labels(self):
    return bool(len(self.labels)) and bool(np.all(self.labels >= 0))

  def subset(self, idx, name=None):
    idx = np.asarray(idx)
    take = lambda a: None if a is None else a[idx]
    return Source(labels=self.labels[idx], images=take(self.images), paths=take(self.paths),
                  class_names=self.class_names, name=name or self.name, skipped=self.skipped,
                  cache_size=self.cache_size, eval_images=take(self.eval_images),
                  eval_crop_fraction=self.eval_crop_fraction)


@dataclasses.dataclass
class StreamSource:
  """A tfds split too large to hold decoded in memory (e.g. imagenet2012), read as a stream.

  Its pipeline shards files per input pipeline (tfds ReadConfig.input_context), shuffles with a
  seeded buffer and derives augmentation seeds from (seed, pipeline, position). It is reproducible
  for a fixed number of input pipelines, but unlike in-memory sources its global batch depends on
  how many workers read it.
  """
  builder: object
  split: str
  num_examples: int
  class_names: List[str]
  labelled: bool
  name: str = ""
  skipped: int = 0
  shuffle_buffer: int = 10_000

  def __len__(self):
    return self.num_examples

  @property
  def has_labels(self):
    return self.labelled


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
  from sklearn.datasets import load_digits
  d = load_digits()
  images = (d.images / 16.0 * 255.0).round().astype(np.uint8)
  return numpy_source(images, d.target, [str(i) for i in range(10)], name="digits")


def split_balanced(source, n, seed):
  """(rest, held_out): a seeded held-out set of `n` examples with equal counts per class (±1)."""
  if n <= 0:
    raise DataError("--val_images must be > 0 to carve a validation split")
  if n >= len(source):
    raise DataError(f"--val_images={n} must be smaller than the {len(source)} training images")
  rng = np.random.default_rng(seed)
  classes = np.unique(source.labels)
  per_class = {c: rng.permutation(np.flatnonzero(source.labels == c)) for c in classes}
  take = {c: n // len(classes) for c in classes}
  for c in rng.permutation(classes)[: n % len(classes)]:
    take[c] += 1
  short = [c for c in classes if take[c] > len(per_class[c])]
  if short:
    raise DataError(f"--val_images={n} asks for more images of class {short[0]} than it has")
  held = np.sort(np.concatenate([per_class[c][: take[c]] for c in classes]))
  rest = np.setdiff1d(np.arange(len(source)), held)
  return source.subset(rest), source.subset(held, name=source.name + "-val")


def folder_source(image_dir, flag="--image_dir"):
  """Images under `image_dir`: class sub-folders (labels from folder names) or a flat folder."""
  if not image_dir or not os.path.isdir(image_dir):
    raise DataError(f"{flag}={image_dir!r} is not a directory; point it at a folder of images")
  is_image = lambda f: f.lower().endswith(IMAGE_EXTENSIONS)
  subdirs = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
  paths, labels, names = [], [], []
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
  from absl import logging
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
  views = (_resize_uint8(image, size),)
  if eval_crop_fraction < 1.0:
    view = augment.eval_transform(image, size, eval_crop_fraction)
    views += (tf.cast(tf.round(view * 255.0), tf.uint8),)
  return views


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
  """Decodes a file source into memory at size x size when it fits `limit_mb`, with the
  evaluation views for `eval_crop_fraction` < 1 (twice the memory); unreadable files are left out
  and counted in `skipped` (or raise a DataError when `skip_bad` is False). Returns the source
  unchanged when it does not fit."""
  if (source.images is not None
      or _cache_bytes(len(source), size, eval_crop_fraction) > limit_mb * 2 ** 20):
    return source
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(source)), source.paths))

  def load(i, path):
    image = decode_image(tf.io.read_file(path))
    return i, _cached_views(image, size, eval_crop_fraction)

  ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors().batch(1024)
  idx, images = [], []
  for i, views in ds.as_numpy_iterator():
    idx.append(i)
    images.append(views)
  idx = np.concatenate(idx) if idx else np.zeros([0], np.int64)
  out = _drop_bad(source, idx, skip_bad)
  if out is source:
    out = source.subset(idx)
  out.paths = None
  return _set_cached(out, images, size, eval_crop_fraction)


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
  import tensorflow_datasets as tfds
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
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def prep(ex):
    image, label = _tfds_example(ex)
    return _cached_views(image, size, eval_crop_fraction), label

  images, labels = [], []
  for views, lb in ds.map(prep, num_parallel_calls=AUTOTUNE).batch(1024).as_numpy_iterator():
    images.append(views)
    labels.append(lb)
  out = Source(labels=np.concatenate(labels), class_names=names, name=f"{name}:{split}")
  return _set_cached(out, images, size, eval_crop_fraction)


def _tfds_example(ex):
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
    if isinstance(train, StreamSource):
      raise DataError(f"--val_images needs a dataset held in memory; {train.name} is streamed, "
                      "use --eval_split instead")
    if not train.has_labels:
      raise DataError("--val_images needs labelled training data (class sub-folders)")
    train, held = split_balanced(train, cfg.val_images, seed)
  return train, held


def knn_bank_source(cfg: DataConfig, train):
  """The labelled images kNN votes with and the supervised evaluations train on: the
  --knn_train_split of the tfds dataset, else the training source itself."""
  if not cfg.knn_train_split or cfg.knn_train_split == cfg.train_split:
    return train
  return tfds_source(cfg.dataset, cfg.knn_train_split, cfg.data_dir, cfg.image_size,
                     cfg.cache_limit_mb, cfg.eval_crop_fraction)


def _load_fn(source):
  """index tensor -> uint8 image [H, W, 3]."""
  if source.images is not None:
    images = tf.constant(source.images)
    return lambda i: tf.gather(images, i)
  paths = tf.constant(source.paths)
  return lambda i: decode_image(tf.io.read_file(tf.gather(paths, i)))


def steps_per_epoch(num_examples, global_batch):
  return num_examples // global_batch


def pretrain_dataset(source, aug: AugmentConfig, image_size, global_batch, seed, start_step=0,
                     input_context: Optional[tf.distribute.InputContext] = None):
  """Per-replica batches {"view1", "view2", "label"} for the replicas of one input pipeline.

  For global step s and global replica r, the rows are stream positions
  s * global_batch + r * per_replica + [0, per_replica). Batches come out replica after replica,
  which is the order tf.distribute hands them to a worker's local replicas.
  """
  n = len(source)
  spe = steps_per_epoch(n, global_batch)
  if spe < 1:
    raise DataError(f"--batch_size={global_batch} is larger than the {n} training examples; "
                    "lower it")
  ctx = input_context or tf.distribute.InputContext()
  replicas = ctx.num_replicas_in_sync
  if global_batch % replicas:
    raise DataError(f"--batch_size={global_batch} must be divisible by the {replicas} replicas")
  per_replica = global_batch // replicas
  local = replicas // ctx.num_input_pipelines
  if isinstance(source, StreamSource):
    return _stream_pretrain_dataset(source, aug, image_size, per_replica, local, seed,
                                    start_step, ctx)
  first = ctx.input_pipeline_id * local
  epoch_len = spe * global_batch
  load = _load_fn(source)
  labels = tf.constant(source.labels, tf.int32)

  # Row offsets within one global batch for this pipeline's replicas, in replica order.
  offsets = tf.constant(
      np.concatenate([np.arange(per_replica) + (first + r) * per_replica for r in range(local)]),
      tf.int64)

  def positions(step):
    return tf.data.Dataset.from_tensor_slices(step * global_batch + offsets)

  def element(pos):
    epoch = pos // epoch_len
    within = pos % epoch_len
    example = tf.random.experimental.index_shuffle(
        within, tf.stack([tf.cast(seed, tf.int64), epoch]), tf.constant(n - 1, tf.int64))
    image = tf.image.convert_image_dtype(load(example), tf.float32)
    view1, view2 = augment.two_views(image, augment.example_seed(seed, epoch, example),
                                     image_size, aug)
    return {"view1": view1, "view2": view2, "label": tf.gather(labels, example)}

  ds = tf.data.Dataset.range(start_step, tf.int64.max).flat_map(positions)
  ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  # flat_map hides that the stream never ends. Declared infinite, multi-worker input keeps the
  # static batch dimension (tf.distribute relaxes it to None for finite/unknown datasets in
  # multi-worker mode, in case workers run out of data unevenly), which the train step needs.
  ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
  options = tf.data.Options()
  options.experimental_optimization.map_parallelization = True
  options.autotune.enabled = True
  return ds.with_options(options).prefetch(AUTOTUNE)


def _stream_pretrain_dataset(source, aug, image_size, per_replica, local, seed, start_step, ctx):
  import tensorflow_datasets as tfds
  read_config = tfds.ReadConfig(input_context=ctx, shuffle_seed=seed, try_autocache=False)
  ds = source.builder.as_dataset(split=source.split, shuffle_files=True, read_config=read_config)
  ds = ds.repeat().shuffle(source.shuffle_buffer, seed=seed).enumerate()
  pipeline = ctx.input_pipeline_id

  def element(position, ex):
    image, label = _tfds_example(ex)
    image = tf.image.convert_image_dtype(image, tf.float32)
    s = augment.example_seed(seed, pipeline, position)
    view1, view2 = augment.two_views(image, s, image_size, aug)
    return {"view1": view1, "view2": view2, "label": label}

  ds = ds.skip(start_step * local * per_replica)
  ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(per_replica, drop_remainder=True).prefetch(AUTOTUNE)


def distributed_pretrain_dataset(strategy, source, aug, image_size, global_batch, seed,
                                 start_step=0):
  return strategy.distribute_datasets_from_function(
      lambda ctx: pretrain_dataset(source, aug, image_size, global_batch, seed, start_step, ctx))


def eval_dataset(source, image_size, batch_size=256, crop_fraction=1.0):
  """(images float [b, S, S, 3] in [0, 1], labels) in source order, no augmentation:
  augment.eval_transform of each decoded image at `crop_fraction` (the cached evaluation views
  when the source holds them)."""
  if isinstance(source, StreamSource):
    ds = source.builder.as_dataset(split=source.split, shuffle_files=False)

    def prep(ex):
      image, label = _tfds_example(ex)
      return augment.eval_transform(image, image_size, crop_fraction), label

    return ds.map(prep, num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(AUTOTUNE)
  labels = tf.constant(source.labels, tf.int32)
  if (source.eval_images is not None and source.eval_crop_fraction == crop_fraction
      and source.eval_images.shape[1:3] == (image_size, image_size)):
    views = tf.constant(source.eval_images)
    transform = lambda i: tf.image.convert_image_dtype(tf.gather(views, i), tf.float32)
  elif crop_fraction != 1.0 and source.cache_size:
    # A squashed image has lost its aspect ratio: cropping it would silently give other pixels.
    raise DataError(f"{source.name!r} is cached at {source.cache_size}x{source.cache_size} "
                    f"without evaluation views for crop fraction {crop_fraction}; load it with "
                    f"DataConfig(eval_crop_fraction={crop_fraction})")
  else:
    load = _load_fn(source)
    transform = lambda i: augment.eval_transform(load(i), image_size, crop_fraction)

  def element(i):
    return transform(i), tf.gather(labels, i)

  ds = tf.data.Dataset.range(len(source)).map(element, num_parallel_calls=AUTOTUNE)
  return ds.batch(batch_size).prefetch(AUTOTUNE)
