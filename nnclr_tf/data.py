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
  images: np.ndarray | None = None
  paths: np.ndarray | None = None
  class_names: list[str] = dataclasses.field(default_factory=list)
  name: str = ""
  skipped: int = 0  # unreadable files left out
  # Set by the in-memory caches: `images` were squashed to cache_size x cache_size, so their
  # aspect ratio is lost (0: `images` are the originals). For an evaluation crop fraction < 1 the
  # cache also keeps each original's evaluation view (uint8 [N, S, S, 3], augment.eval_transform
  # at `eval_crop_fraction`), which cannot be made from a squashed image.
  cache_size: int = 0
  eval_images: np.ndarray | None = None
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
  builder: object
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

  @property
  def random_access(self):
    """Whether examples can be read by index (an ArrayRecord dataset, `array_record` installed)."""
    import importlib.util
    fmt = getattr(self.builder.info.file_format, "value", self.builder.info.file_format)
    return fmt == "array_record" and importlib.util.find_spec("array_record") is not None


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


# Off: in benchmarks/input_pipeline.py (224 px, ImageNet-shaped JPEGs, 2 cores) decoding the two
# crop windows separately was not faster than one full decode and two uint8 slices (92.7 vs 101.7
# pairs/s, benchmarks/RESULTS.md): the windows overlap and each re-reads the entropy-coded data.
FUSED_JPEG_CROP = False


def _is_jpeg(data):
  return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def two_views_encoded(data, seed, size, aug, fused=None):
  """augment.two_views of an encoded image without decoding it whole when it is a JPEG: the crop
  boxes come from the header's shape (`tf.image.extract_jpeg_shape`) and only those windows are
  decoded. Same boxes and pixels as decoding first; other formats are decoded in full."""
  fused = FUSED_JPEG_CROP if fused is None else fused

  def jpeg():
    shape = tf.concat([tf.image.extract_jpeg_shape(data)[:2], [3]], 0)

    def read(begin, crop):
      window = tf.image.decode_and_crop_jpeg(
          data, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)
      window.set_shape([None, None, 3])
      return window

    return augment.two_views_windows(shape, read, seed, size, aug)

  def whole():
    return augment.two_views(decode_image(data), seed, size, aug)

  if not fused:
    return whole()
  return tf.cond(_is_jpeg(data), jpeg, whole)


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


def _item_fn(source):
  """(index tensor -> uint8 image [H, W, 3] or encoded bytes, whether it returns bytes)."""
  if source.images is not None:
    images = tf.constant(source.images)
    return (lambda i: tf.gather(images, i)), False
  paths = tf.constant(source.paths)
  return (lambda i: tf.io.read_file(tf.gather(paths, i))), True


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
                     input_context: tf.distribute.InputContext | None = None):
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
  if isinstance(source, StreamSource) and not source.random_access:
    return _tfrecord_pretrain_dataset(source, aug, image_size, per_replica, local, seed,
                                      start_step, ctx)
  first = ctx.input_pipeline_id * local
  epoch_len = spe * global_batch

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
    return example, epoch

  def augmented(example, epoch, item, label):
    s = augment.example_seed(seed, epoch, example)
    if source_is_encoded:
      view1, view2 = two_views_encoded(item, s, image_size, aug)
    else:
      view1, view2 = augment.two_views(item, s, image_size, aug)
    return {"view1": view1, "view2": view2, "label": label}

  ds = tf.data.Dataset.range(start_step, tf.int64.max).flat_map(positions)
  if isinstance(source, StreamSource):
    # Random access by index (ArrayRecord): records are read a batch at a time, one Python call.
    read = _record_reader(source)
    ds = ds.map(element).batch(per_replica).map(lambda e, ep: (e, ep) + read(e)).unbatch()
    source_is_encoded = True
  else:
    load, source_is_encoded = _item_fn(source)
    labels = tf.constant(source.labels, tf.int32)

    def loaded(e, ep):
      return e, ep, load(e), tf.gather(labels, e)

    ds = ds.map(lambda pos: augmented(*loaded(*element(pos))), num_parallel_calls=AUTOTUNE,
                deterministic=True)
  if isinstance(source, StreamSource):
    ds = ds.map(augmented, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  # flat_map hides that the stream never ends. Declared infinite, multi-worker input keeps the
  # static batch dimension (tf.distribute relaxes it to None for finite/unknown datasets in
  # multi-worker mode, in case workers run out of data unevenly), which the train step needs.
  ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
  options = tf.data.Options()
  options.experimental_optimization.map_parallelization = True
  options.autotune.enabled = True
  return ds.with_options(options).prefetch(AUTOTUNE)


def _raw_example(source):
  """serialized tfds example -> (encoded image bytes, int32 label or -1), nothing decoded."""
  import tensorflow_datasets as tfds
  features = source.builder.info.features

  def parse(record):
    ex = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
    label = tf.cast(ex["label"], tf.int32) if "label" in ex else tf.constant(-1, tf.int32)
    return ex["image"], label

  return parse


def _record_reader(source):
  """int64 [b] example indices -> (encoded images [b], labels [b]) of an ArrayRecord split."""
  records = source.builder.as_data_source(split=source.split).data_source
  parse = _raw_example(source)

  def fetch(idx):
    return np.asarray(records.__getitems__([int(i) for i in idx]), dtype=object)

  def read(idx):
    raw = tf.numpy_function(fetch, [idx], tf.string, stateful=False)
    raw.set_shape(idx.shape)
    return tf.map_fn(parse, raw, fn_output_signature=(tf.string, tf.int32))

  return read


def _shard_plan(source, pipeline, pipelines):
  """This pipeline's shards of a TFRecord split, as (files, skips, takes) of tfds's file
  instructions (a sliced split reads part of a file)."""
  instructions = source.builder.info.splits[source.split].file_instructions
  mine = instructions[pipeline::pipelines]
  if not mine:
    raise DataError(f"{source.name} has {len(instructions)} files for {pipelines} input "
                    "pipelines; every pipeline needs at least one (prepare it with more shards "
                    "or as ArrayRecord)")
  files = np.array([str(f.filename) for f in mine])
  skips = np.array([f.skip for f in mine], np.int64)
  takes = np.array([f.take for f in mine], np.int64)
  return files, skips, takes


def _stream_key(seed, *parts):
  """A [2] stateless seed from the run seed and integer `parts`."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5712EA, tf.int64)])
  for p in parts:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(p, tf.int64))
  return key


def _shard_order(seed, epoch, pipeline, num_shards):
  """The order an input pipeline reads its shards in during `epoch`: a function of these only."""
  key = _stream_key(seed, 0, epoch, pipeline)
  return tf.random.experimental.index_shuffle(
      tf.range(num_shards, dtype=tf.int64), key, tf.constant(num_shards - 1, tf.int64))


def _tfrecord_pretrain_dataset(source, aug, image_size, per_replica, local, seed, start_step,
                               ctx):
  """The stream of a TFRecord split (see StreamSource): blocks of shards in a per-epoch order,
  their raw records permuted within the block, then decoded (crop windows only) and augmented
  with seeds from (seed, pipeline, position). Resuming at a step computes which block holds its
  first row and skips raw records within that block only."""
  pipeline, pipelines = ctx.input_pipeline_id, ctx.num_input_pipelines
  files, skips, takes = _shard_plan(source, pipeline, pipelines)
  num_shards, per_block = len(files), max(1, source.shards_per_block)
  blocks = -(-num_shards // per_block)
  epoch_len = int(takes.sum())
  files_t, skips_t, takes_t = tf.constant(files), tf.constant(skips), tf.constant(takes)

  def block_shards(epoch, block):
    order = _shard_order(seed, epoch, pipeline, num_shards)
    return order[block * per_block:tf.minimum((block + 1) * per_block, num_shards)]

  def read_block(g):
    epoch, block = g // blocks, g % blocks
    shards = block_shards(epoch, block)
    parts = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files_t, shards), tf.gather(skips_t, shards), tf.gather(takes_t, shards)))
    raw = parts.flat_map(lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t))
    records = raw.batch(epoch_len).get_single_element()
    key = _stream_key(seed, 1, g, pipeline)
    count = tf.cast(tf.size(records), tf.int64)
    perm = tf.random.experimental.index_shuffle(tf.range(count), key, count - 1)
    return tf.data.Dataset.from_tensor_slices(tf.gather(records, perm))

  # The first row this pipeline needs: which epoch, which block of that epoch's order, how far in.
  start = start_step * local * per_replica
  epoch, within = divmod(start, epoch_len)
  order = _shard_order(seed, epoch, pipeline, num_shards).numpy()
  sizes = [takes[order[b * per_block:(b + 1) * per_block]].sum() for b in range(blocks)]
  first = int(np.searchsorted(np.cumsum(sizes), within, side="right"))
  offset = within - int(np.sum(sizes[:first]))

  ds = tf.data.Dataset.range(epoch * blocks + first, tf.int64.max).flat_map(read_block)
  ds = ds.skip(offset)
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, tf.int64.max), ds)
  parse = _raw_example(source)

  def element(position, record):
    image, label = parse(record)
    s = augment.example_seed(seed, pipeline, position)
    view1, view2 = two_views_encoded(image, s, image_size, aug)
    return {"view1": view1, "view2": view2, "label": label}

  ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
  return ds.prefetch(AUTOTUNE)


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


# ------------------------------------------------------------------------------------------------
# A user's own tf.data

_STREAM_ACCEPTS = ("a tf.data.Dataset of single images [H, W, C] or of (image, label) pairs, with "
                   "C = 1 or 3, uint8 or float in [0, 1], any H and W, integer scalar labels")


def _user_element(spec):
  """(has_labels) for an accepted element_spec, else a DataError naming what was given."""
  def is_image(s):
    return (isinstance(s, tf.TensorSpec) and s.shape.rank == 3 and s.shape[-1] in (1, 3)
            and (s.dtype == tf.uint8 or s.dtype.is_floating))

  def is_label(s):
    return isinstance(s, tf.TensorSpec) and s.shape.rank == 0 and s.dtype.is_integer

  if is_image(spec):
    return False
  if isinstance(spec, (tuple, list)) and len(spec) == 2 and is_image(spec[0]) and is_label(
      spec[1]):
    return True
  hint = ""
  first = spec[0] if isinstance(spec, (tuple, list)) and spec else spec
  if isinstance(first, tf.TensorSpec) and first.shape.rank == 4:
    hint = "; it looks batched: pass dataset.unbatch()"
  elif isinstance(spec, dict):
    hint = "; map a dict to (image, label) first, e.g. ds.map(lambda d: (d['image'], d['label']))"
  raise DataError(f"pretraining_stream takes {_STREAM_ACCEPTS}; got element_spec {spec}{hint}")


def pretraining_stream(dataset, aug: AugmentConfig | None = None, image_size=32,
                       batch_size=256, epochs=None, seed=0):
  """A user's tf.data of images or (image, label) -> the batches `NNCLR.fit` trains on:
  {"view1", "view2": float [B, S, S, 3] in [0, 1], "label": int32 [B], -1 when unlabelled}.

  Each image gives two views of the pretraining augmentation (`augment.two_views` with `aug`,
  default AugmentConfig(), the paper's) at `image_size`. Images may be uint8 or float in [0, 1],
  grayscale or RGB, of any size. `dataset` is read in its own order (shuffle it yourself) and
  `batch_size` is the global batch (divisible by the replica count; the model's queue_size must
  be a multiple of it); a last partial batch is dropped.

  `epochs=None` repeats forever (give `fit` a `steps_per_epoch`); `epochs=k` makes a finite
  stream of k passes, so `fit(stream)` without steps_per_epoch ends its epochs (k=1 and
  `fit(epochs=N)` is the usual Keras pattern). Augmentation seeds are drawn from `seed` afresh on
  every pass over the stream, so the views differ between fit epochs and repeat between runs.
  Anything but images or (image, label) pairs is a DataError naming the accepted structures.
  """
  if not isinstance(dataset, tf.data.Dataset):
    raise DataError(f"pretraining_stream takes {_STREAM_ACCEPTS}; got {type(dataset).__name__}")
  if epochs is not None and int(epochs) < 1:
    raise DataError(f"epochs={epochs} must be None (repeat forever) or >= 1")
  labelled = _user_element(dataset.element_spec)
  aug = aug or AugmentConfig()
  seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
  if not labelled:
    dataset = dataset.map(lambda image: (image, tf.constant(-1, tf.int32)))

  def views(element, example_seed):
    image, label = element
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    v1, v2 = augment.two_views(image, example_seed, image_size, aug)
    return {"view1": v1, "view2": v2, "label": tf.cast(label, tf.int32)}

  stream = dataset.repeat(epochs) if epochs is not None else dataset.repeat()
  stream = tf.data.Dataset.zip(stream, seeds).map(views, num_parallel_calls=AUTOTUNE)
  return stream.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
