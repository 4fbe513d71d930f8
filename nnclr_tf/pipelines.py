"""tf.data pipelines over sources (`nnclr_tf/sources.py`): pretraining, evaluation, fine-tuning
and a user's own tf.data.

The pretraining pipeline is a pure function of (seed, global step): element `i` of the global stream
is example `index_shuffle(i mod E, seed, epoch)` of the epoch `i // E` (E = steps_per_epoch x global
batch), augmented with a seed derived from (seed, epoch, example index). Each input pipeline builds
only the rows of its own replicas, so the global batch of step s is the same whatever the number of
replicas or workers, and a run resumed at step s sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nnclr_tf import augment, colour
from nnclr_tf.checks import check_examples, check_replicas
from nnclr_tf.config import AugmentConfig
from nnclr_tf.errors import DataError
from nnclr_tf.sources import AUTOTUNE, decode_image, tfds_example

FUSED_JPEG_CROP = False


def _is_jpeg(data):
  return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def _encoded_views(data, views, fused):
  """views(shape, read_window) of an encoded image: decoded whole and sliced, or for a JPEG with
  `fused`, decoding only the crop windows (the boxes depend on the header's shape alone, so the
  pixels are the same)."""
  fused = FUSED_JPEG_CROP if fused is None else fused

  def whole():
    image = decode_image(data)
    return views(tf.shape(image), augment.slicer(image))

  def jpeg():
    shape = tf.concat([tf.image.extract_jpeg_shape(data)[:2], [3]], 0)

    def read(begin, crop):
      window = tf.image.decode_and_crop_jpeg(
          data, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)
      window.set_shape([None, None, 3])
      return window

    return views(shape, read)

  if not fused:
    return whole()
  return tf.cond(_is_jpeg(data), jpeg, whole)


def crop_views_encoded(data, seed, size, aug, fused=None):
  """augment.crop_views of an encoded image without decoding it whole when it is a JPEG: the crop
  boxes come from the header's shape (`tf.image.extract_jpeg_shape`) and only those windows are
  decoded. Same boxes and pixels as decoding first; other formats are decoded in full."""
  return _encoded_views(
      data, lambda shape, read: augment.crop_views(shape, read, seed, size, aug), fused)


def two_views_encoded(data, seed, size, aug, fused=None):
  """augment.two_views of an encoded image (its crop_views_encoded, coloured)."""
  return tuple(augment.coloured(half) for half in crop_views_encoded(data, seed, size, aug, fused))


def one_view_encoded(data, seed, size, aug, fused=None):
  """augment.augment_view (view 0) of an encoded image, as two_views_encoded."""
  return augment.coloured(_encoded_views(
      data, lambda shape, read: augment.crop_view(shape, read, seed, size, aug, 0), fused))


def steps_per_epoch(num_examples, global_batch):
  return num_examples // global_batch


def _permuted(index, key, n):
  """Where `index` (int64, any shape) lands in the permutation of [0, n) drawn from the [2]
  int64 `key`. Every shuffle here (examples, shards, records within a block) is this one, so each
  is a function of its key and nothing else: no shuffle buffer to replay on resume."""
  return tf.random.experimental.index_shuffle(index, key, tf.cast(n, tf.int64) - 1)


def _example_at(position, seed, epoch_len, n):
  """(example, epoch) at a stream position: epochs of `epoch_len` positions, each the first
  `epoch_len` of a permutation of the n examples drawn from (seed, epoch). Pretraining and
  fine-tuning index their streams with it; a position's example never depends on what was read
  before it."""
  epoch = position // epoch_len
  return _permuted(position % epoch_len, tf.stack([tf.cast(seed, tf.int64), epoch]), n), epoch


def _halves(views, label):
  """The per-example element of the pretraining stream, from augment.crop_views' two halves:
  uint8 crops and their colour parameters (`_finish` applies them after batching)."""
  (view1, colour1), (view2, colour2) = views
  return {"view1": view1, "view2": view2, "colour1": colour1, "colour2": colour2,
          "label": label}


def _finish(aug: AugmentConfig):
  """What follows batching: with augment_on="host", the colour stage of each view, leaving the
  element NNCLR trains on ({"view1", "view2": float [b, S, S, 3], "label"}); with "device", the
  batch as it is (uint8 crops and "colour1"/"colour2", which NNCLR's step applies)."""
  if aug.augment_on == "device":
    return None

  stages = (colour.stages_of(aug, 0), colour.stages_of(aug, 1))

  def host(batch):
    return {"view1": colour.apply_on_host(batch["view1"], batch["colour1"], stages[0]),
            "view2": colour.apply_on_host(batch["view2"], batch["colour2"], stages[1]),
            "label": batch["label"]}

  return host


def _endless_batches(ds, batch, finish=None):
  # flat_map hides that the stream never ends. Declared infinite, multi-worker input keeps the
  # static batch dimension (tf.distribute relaxes it to None for finite/unknown datasets in
  # multi-worker mode, in case workers run out of data unevenly), which the train step needs.
  ds = ds.batch(batch, drop_remainder=True)
  if finish is not None:
    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))


def pretrain_dataset(source, aug: AugmentConfig, image_size, global_batch, seed, start_step=0,
                     input_context: tf.distribute.InputContext | None = None):
  """Per-replica batches {"view1", "view2", "label"} for the replicas of one input pipeline:
  float views [b, S, S, 3] in [0, 1]; with aug.augment_on="device", uint8 crops [b, S, S, 3]
  and their colour parameters "colour1", "colour2" [b, colour.NUM_PARAMS], whose colour stage
  NNCLR's train step applies (`colour.apply`): the same views, made on the accelerator.

  For global step s and global replica r, the rows are stream positions
  s * global_batch + r * per_replica + [0, per_replica). Batches come out replica after replica,
  which is the order tf.distribute hands them to a worker's local replicas.
  """
  def element(item, example_seed, label, encoded):
    if encoded:
      return _halves(crop_views_encoded(item, example_seed, image_size, aug), label)
    return _halves(augment.crop_views(tf.shape(item), augment.slicer(item),
                                      example_seed, image_size, aug), label)

  return _positional_stream(source, global_batch, seed, start_step, input_context, element,
                            _finish(aug))


def linear_dataset(source, aug: AugmentConfig, image_size, global_batch, seed, start_step=0,
                   input_context: tf.distribute.InputContext | None = None):
  """Per-replica batches (image [b, S, S, 3], label [b]) of the SGD linear protocol: the
  pretraining stream's examples and order (a pure function of (seed, step), whatever the replica
  count), one view each of `augment.crop_flip(aug)`."""
  views = augment.crop_flip(aug)

  def element(item, example_seed, label, encoded):
    if encoded:
      return one_view_encoded(item, example_seed, image_size, views), label
    return augment.augment_view(item, example_seed, image_size, views, 0), label

  return _positional_stream(source, global_batch, seed, start_step, input_context, element)


def _positional_stream(source, global_batch, seed, start_step, input_context, element,
                       finish=None):
  """The stream of pretrain_dataset with each example made by element(item, example seed, label,
  encoded) (`item` is the decoded image, or its encoded bytes when `encoded`) and each batch by
  finish(batch)."""
  n = len(source)
  check_examples(global_batch, n)
  spe = steps_per_epoch(n, global_batch)
  ctx = input_context or tf.distribute.InputContext()
  replicas = ctx.num_replicas_in_sync
  check_replicas(global_batch, replicas)
  per_replica = global_batch // replicas
  local = replicas // ctx.num_input_pipelines
  if not source.random_access:
    return _tfrecord_stream(source, element, per_replica, local, seed, start_step, ctx, finish)
  first = ctx.input_pipeline_id * local
  epoch_len = spe * global_batch

  # Row offsets within one global batch for this pipeline's replicas, in replica order.
  offsets = tf.constant(
      np.concatenate([np.arange(per_replica) + (first + r) * per_replica for r in range(local)]),
      tf.int64)

  def positions(step):
    return tf.data.Dataset.from_tensor_slices(step * global_batch + offsets)

  at = lambda pos: _example_at(pos, seed, epoch_len, n)
  read = source.reader(decode=False)
  encoded = source.encoded

  def with_item(example, epoch):
    return (example, epoch) + read(example)

  def augmented(example, epoch, item, label):
    return element(item, augment.example_seed(seed, epoch, example), label, encoded)

  ds = tf.data.Dataset.range(start_step, tf.int64.max).flat_map(positions)
  if source.streamed:
    # Read by index (ArrayRecord) a batch at a time: one Python call per batch of records.
    ds = ds.map(at).batch(per_replica).map(with_item).unbatch()
    ds = ds.map(augmented, num_parallel_calls=AUTOTUNE, deterministic=True)
  else:
    ds = ds.map(lambda pos: augmented(*with_item(*at(pos))), num_parallel_calls=AUTOTUNE,
                deterministic=True)
  ds = _endless_batches(ds, per_replica, finish)
  options = tf.data.Options()
  options.experimental_optimization.map_parallelization = True
  options.autotune.enabled = True
  return ds.with_options(options).prefetch(AUTOTUNE)


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
  return _permuted(tf.range(num_shards, dtype=tf.int64), _stream_key(seed, 0, epoch, pipeline),
                   num_shards)


def _tfrecord_records(source, seed, start, pipeline, pipelines):
  """(stream position, serialized record) of one input pipeline's stream of a TFRecord split (see
  StreamSource), from position `start`: blocks of shards in a per-epoch order, their raw records
  permuted within the block. Starting later computes which block holds position `start` and
  skips raw records within that block only. Pretraining and fine-tuning both read it."""
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
    perm = _permuted(tf.range(count), key, count)
    return tf.data.Dataset.from_tensor_slices(tf.gather(records, perm))

  # The first row this pipeline needs: which epoch, which block of that epoch's order, how far in.
  epoch, within = divmod(start, epoch_len)
  order = _shard_order(seed, epoch, pipeline, num_shards).numpy()
  sizes = [takes[order[b * per_block:(b + 1) * per_block]].sum() for b in range(blocks)]
  first = int(np.searchsorted(np.cumsum(sizes), within, side="right"))
  offset = within - int(np.sum(sizes[:first]))

  ds = tf.data.Dataset.range(epoch * blocks + first, tf.int64.max).flat_map(read_block)
  ds = ds.skip(offset)
  return tf.data.Dataset.zip(tf.data.Dataset.range(start, tf.int64.max), ds)


def _tfrecord_stream(source, element, per_replica, local, seed, start_step, ctx, finish):
  """The stream of a TFRecord split (`_tfrecord_records`), decoded (crop windows only) and made
  by `element` with seeds from (seed, pipeline, position)."""
  pipeline = ctx.input_pipeline_id
  ds = _tfrecord_records(source, seed, start_step * local * per_replica, pipeline,
                         ctx.num_input_pipelines)
  parse = source.record_parser()

  def made(position, record):
    image, label = parse(record)
    return element(image, augment.example_seed(seed, pipeline, position), label, True)

  ds = ds.map(made, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _endless_batches(ds, per_replica, finish).prefetch(AUTOTUNE)


def distributed_pretrain_dataset(strategy, source, aug, image_size, global_batch, seed,
                                 start_step=0):
  return strategy.distribute_datasets_from_function(
      lambda ctx: pretrain_dataset(source, aug, image_size, global_batch, seed, start_step, ctx))


def distributed_linear_dataset(strategy, source, aug, image_size, global_batch, seed,
                               start_step=0):
  return strategy.distribute_datasets_from_function(
      lambda ctx: linear_dataset(source, aug, image_size, global_batch, seed, start_step, ctx))


def eval_dataset(source, image_size, batch_size=256, crop_fraction=1.0):
  """(images float [b, S, S, 3] in [0, 1], labels) in source order, no augmentation:
  augment.eval_transform of each decoded image at `crop_fraction` (the cached evaluation views
  when the source holds them)."""
  if source.streamed:
    ds = source.builder.as_dataset(split=source.split, shuffle_files=False)

    def prep(ex):
      image, label = tfds_example(ex)
      return augment.eval_transform(image, image_size, crop_fraction), label

    return ds.map(prep, num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(AUTOTUNE)
  if (source.eval_images is not None and source.eval_crop_fraction == crop_fraction
      and source.eval_images.shape[1:3] == (image_size, image_size)):
    views, labels = tf.constant(source.eval_images), tf.constant(source.labels, tf.int32)

    def element(i):
      return tf.image.convert_image_dtype(tf.gather(views, i), tf.float32), tf.gather(labels, i)
  elif crop_fraction != 1.0 and source.cache_size:
    # Cached without the views of this fraction: cutting them from the cached copy (made for
    # another fraction) would silently give other pixels.
    raise DataError(f"{source.name!r} is cached at {source.cache_size}x{source.cache_size} "
                    f"without evaluation views for crop fraction {crop_fraction}; load it with "
                    f"DataConfig(eval_crop_fraction={crop_fraction})")
  else:
    read = source.reader()

    def element(i):
      image, label = read(i)
      return augment.eval_transform(image, image_size, crop_fraction), label

  ds = tf.data.Dataset.range(len(source)).map(element, num_parallel_calls=AUTOTUNE)
  return ds.batch(batch_size).prefetch(AUTOTUNE)


def finetune_dataset(source, image_size, batch_size, seed, aug: AugmentConfig):
  """Endless (image, label) batches for fine-tuning: the pretraining stream's shuffle with an
  epoch of every example, random resized crop (aug.crop_scale) and flip (aug.flip_prob), nothing
  else.

  A streamed tfds split is read from its files, never held: by index as the in-memory source is
  (ArrayRecord: the same batches as that split in memory), else in TFRecord blocks of shards
  (`_tfrecord_records`, one input pipeline), with seeds from (seed, position)."""
  n = len(source)

  def view(image, label, s):
    image = tf.image.convert_image_dtype(image, tf.float32)
    s = augment.split_seed(s, 2)
    if aug.crop:
      image = augment.crop_and_resize(image, s[0], image_size, aug.crop_scale, aug.crop_ratio,
                                      aug.crop_sampler)
    else:
      image = augment.center_resize(image, image_size)
    return augment.flip(image, s[1], aug.flip_prob), label

  positions = tf.data.Dataset.range(tf.int64.max)
  if source.streamed and not source.random_access:
    parse = source.record_parser()

    def record_view(position, record):
      data, label = parse(record)
      return view(decode_image(data), label, augment.example_seed(seed, 0, position))

    ds = _tfrecord_records(source, seed, 0, 0, 1).map(record_view, num_parallel_calls=AUTOTUNE,
                                                       deterministic=True)
  elif source.streamed:
    read = source.reader()  # a batch of records per call

    def with_item(example, epoch):
      return (example, epoch) + read(example)

    def item_view(example, epoch, data, label):
      return view(decode_image(data), label, augment.example_seed(seed, epoch, example))

    ds = positions.map(lambda pos: _example_at(pos, seed, n, n)).batch(batch_size)
    ds = ds.map(with_item).unbatch().map(item_view, num_parallel_calls=AUTOTUNE,
                                         deterministic=True)
  else:
    read = source.reader()

    def element(pos):
      example, epoch = _example_at(pos, seed, n, n)
      image, label = read(example)
      return view(image, label, augment.example_seed(seed, epoch, example))

    ds = positions.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


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
  default AugmentConfig(), the paper's) at `image_size`; with aug.augment_on="device" the
  batches hold uint8 crops and their colour parameters instead, which NNCLR's train step
  colours (see `pretrain_dataset`). Images may be uint8 or float in [0, 1],
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
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    return _halves(augment.crop_views(tf.shape(image), augment.slicer(image),
                                      example_seed, image_size, aug), tf.cast(label, tf.int32))

  stream = dataset.repeat(epochs) if epochs is not None else dataset.repeat()
  stream = tf.data.Dataset.zip(stream, seeds).map(views, num_parallel_calls=AUTOTUNE)
  stream = stream.batch(batch_size, drop_remainder=True)
  finish = _finish(aug)
  if finish is not None:
    stream = stream.map(finish, num_parallel_calls=AUTOTUNE)
  return stream.prefetch(AUTOTUNE)

