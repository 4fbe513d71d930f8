"""Cross-replica helpers and strategy construction.

Inside a replica function these work the same under no strategy, MirroredStrategy,
MultiWorkerMirroredStrategy and TPUStrategy: the global batch is the concatenation of the replicas'
local batches in replica-id order.
"""

from __future__ import annotations

import os

import tensorflow as tf

from nnclr_tf import cluster
from nnclr_tf.errors import StrategyError


def num_replicas():
  return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
  """This replica's id in its sync group, as an int32 tensor (0 without a strategy)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def all_gather(x):
  """Concatenates `x` over replicas along axis 0 (differentiable; identity on one replica)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  # ReplicaContext.all_gather uses the tensor's device as the gather destination. A step input
  # (e.g. the labels) is a tf.function argument with no device, which MultiWorkerMirroredStrategy
  # refuses ("destinations can not be empty"); identity places it on this replica's device.
  x = tf.identity(x)
  gathered = ctx.all_gather(x, axis=0)
  # Keep the static shape (some strategies lose it): the enqueue and XLA need it.
  return tf.reshape(gathered, [x.shape[0] * ctx.num_replicas_in_sync] + list(x.shape[1:]))


def in_multi_worker_mode(strategy=None):
  """True under MultiWorkerMirroredStrategy with more than one worker (Keras' own test)."""
  strategy = strategy or tf.distribute.get_strategy()
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def local_rows(x_global, local_batch):
  """This replica's slice of a globally computed tensor (e.g. random draws over the global
  batch)."""
  return tf.slice(x_global, [replica_id() * local_batch] + [0] * (len(x_global.shape) - 1),
                  [local_batch] + list(x_global.shape[1:]))


def split_cpu(n):
  """Splits the physical CPU into n logical devices (must run before TF initialises devices)."""
  cpus = tf.config.list_physical_devices("CPU")
  if n > 1:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def make_strategy(kind="auto", cpu_replicas=1, tpu=None):
  """Builds the tf.distribute strategy named by `kind`.

  auto: MirroredStrategy over all GPUs when there are any, over `cpu_replicas` logical CPUs when
  that is > 1, else the default strategy.
  """
  if kind == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError, OSError) as e:
      # OSError: off Google Cloud, a named TPU is looked up on the GCE metadata server.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
      raise StrategyError(
          f"--strategy=tpu: no TPU found (--tpu={tpu!r}: {reason}). "
          "Run on a TPU VM or pass --tpu=<name>, or use --strategy=auto.") from None
    return tf.distribute.TPUStrategy(resolver)
  if kind == "multi_worker":
    cluster.check_tf_config(os.environ.get("TF_CONFIG"))
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")
  if kind == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if kind == "mirrored" or (kind == "auto" and (len(gpus) > 1 or cpu_replicas > 1)):
    devices = [d.name for d in gpus] if gpus else [d.name for d in cpus[:max(cpu_replicas, 1)]]
    return tf.distribute.MirroredStrategy(devices)
  if kind == "auto":
    return tf.distribute.get_strategy()
  raise ValueError(f"unknown strategy {kind!r}")


def gather_ints(strategy, value):
  """`value` (an int) from every replica of every worker, as a list. A collective: under
  MultiWorkerMirroredStrategy every worker must call it at the same point."""
  per_replica = strategy.run(lambda: tf.constant([value], tf.int64))
  return [int(v) for v in strategy.gather(per_replica, axis=0).numpy()]


def poison_unless_all_finite(grads):
  """Makes every replica's gradients NaN when any replica's gradients are not finite.

  keras.optimizers.LossScaleOptimizer (Keras 3.15, `_tf_apply`) decides between applying and
  skipping a step from the *first local replica's* gradients before they are summed across
  replicas: another replica's overflow would then be applied (NaN weights), and workers whose
  first replicas disagree would part ways inside the all-reduce and hang. One scalar all-reduce
  makes the decision global; finite gradients pass through unchanged (multiplied by 1).
  """
  ctx = tf.distribute.get_replica_context()
  present = [g for g in grads if g is not None]
  if ctx is None or ctx.num_replicas_in_sync == 1 or not present:
    return grads
  bad = tf.add_n([tf.cast(tf.reduce_any(tf.logical_not(tf.math.is_finite(g))), tf.float32)
                  for g in present])
  bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
  factor = tf.where(bad > 0, tf.constant(float("nan")), tf.constant(1.0))
  return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]


def is_chief(strategy):
  """True on the worker that owns model_dir (always true without a multi-worker cluster)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  return cluster.is_chief_task(resolver.task_type, resolver.task_id,
                               resolver.cluster_spec().as_dict())


def worker_dir(model_dir, strategy):
  """model_dir on the chief; a private temporary folder on other workers (TF's multi-worker
  checkpointing contract: every worker saves, only the chief's copy is kept)."""
  if is_chief(strategy):
    return model_dir
  resolver = strategy.cluster_resolver
  return os.path.join(model_dir, ".workers", f"{resolver.task_type}_{resolver.task_id}")
