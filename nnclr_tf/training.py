"""Pretraining with model.fit: optimizer and schedule, checkpoints that resume, timing."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import data as data_lib
from nnclr_tf import distributed
from nnclr_tf.config import OptimConfig, check_batch
from nnclr_tf.errors import (  # noqa: F401
  ConfigError,
  DiskFullError,
  ModelDirError,
  NonFiniteLossError,
  Preempted,
  TrainingError,
)
from nnclr_tf.lars import LARS, is_excluded
from nnclr_tf.model_dir import read_json, write_json, write_text  # noqa: F401
from nnclr_tf.schedules import WarmupCosine, scaled_learning_rate
from nnclr_tf.sgd import CoupledSGD


def check_optim_config(cfg: OptimConfig):
  """Refuses option combinations that would be silently ignored."""
  if cfg.lars_clip_lr and cfg.optimizer != "lars":
    raise ConfigError(f"--lars_clip_lr applies to --optimizer=lars only, not "
                      f"--optimizer={cfg.optimizer}; drop it or use lars")
  if cfg.weight_decay_mode not in ("decoupled", "coupled"):
    raise ConfigError(f"--weight_decay_mode={cfg.weight_decay_mode!r} is unknown; choose "
                      "decoupled or coupled")
  if cfg.weight_decay_mode == "coupled" and cfg.optimizer != "sgd":
    # LARS always adds its decay to the gradient (before the trust ratio) and AdamW is decoupled
    # by definition: neither has a choice to make.
    raise ConfigError(f"--weight_decay_mode=coupled applies to --optimizer=sgd only, not "
                      f"--optimizer={cfg.optimizer}; drop it or use sgd")


def build_optimizer(cfg: OptimConfig, variables, global_batch, total_steps, steps_per_epoch):
  check_optim_config(cfg)
  peak = scaled_learning_rate(cfg.learning_rate, global_batch, cfg.lr_scaling)
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps > 0:
    logging.warning(
        "--warmup_epochs=%g is %d steps, not fewer than the run's %d: the learning rate only "
        "ramps up and ends at its peak, never decaying; lower --warmup_epochs for short runs",
        cfg.warmup_epochs, warmup, total_steps)
  schedule = WarmupCosine(peak, min(warmup, total_steps), total_steps)
  if cfg.optimizer == "lars":
    return LARS(schedule, momentum=cfg.momentum, eta=cfg.lars_eta,
                weight_decay_rate=cfg.weight_decay, clip_lr=cfg.lars_clip_lr)
  no_decay = [v for v in variables if is_excluded(v)]
  if cfg.optimizer == "sgd" and cfg.weight_decay_mode == "coupled":
    return CoupledSGD(schedule, momentum=cfg.momentum, weight_decay_rate=cfg.weight_decay)
  if cfg.optimizer == "sgd":
    opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay or None)
  elif cfg.optimizer == "adamw":
    opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
  else:
    raise ConfigError(f"--optimizer={cfg.optimizer!r} is unknown; choose lars, sgd or adamw")
  if cfg.weight_decay:
    opt.exclude_from_weight_decay(var_list=no_decay)  # biases and BN, by structure
  return opt


validate_batch = check_batch  # batch / support set / replicas / top-k: config.check_batch


def make_checkpoint(model):
  return tf.train.Checkpoint(model=model, optimizer=model.optimizer)


def restore_latest(model, ckpt_dir):
  """Restores the newest checkpoint in ckpt_dir, if any. Returns its path or None.

  A checkpoint of a different architecture is refused with a ConfigError (nothing is written)."""
  latest = tf.train.latest_checkpoint(ckpt_dir)
  if latest:
    try:
      make_checkpoint(model).restore(latest).assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      raise _does_not_fit(ckpt_dir, latest, e) from None
  return latest


def check_checkpoint_fits(model, ckpt_dir):
  """Raises ConfigError when ckpt_dir's newest checkpoint is not of `model`'s architecture (it
  loads the model's part of the checkpoint into `model`, which a resume does anyway)."""
  latest = tf.train.latest_checkpoint(ckpt_dir)
  if latest:
    try:
      tf.train.Checkpoint(model=model).read(latest).assert_existing_objects_matched() \
          .expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      raise _does_not_fit(ckpt_dir, latest, e) from None
  return latest


def _does_not_fit(ckpt_dir, latest, error):
  reason = " ".join(str(error).split())[:300]
  return ModelDirError(f"--model_dir={ckpt_dir} holds {os.path.basename(latest)}, which does not "
                     f"fit this model ({reason}); use a new --model_dir or the flags it was "
                     "trained with")


def state_is_finite(model):
  """True when every float variable of the model (incl. support set) and optimizer is finite."""
  variables = list(model.weights) + list(getattr(model.optimizer, "variables", []))
  for v in variables:
    if "float" in str(v.dtype):
      if not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
        return False
  return True


class NonFiniteGuard(keras.callbacks.Callback):
  """Stops training at the first non-finite loss and remembers the step.

  It must come before CheckpointCallback in the callback list: that callback asks it whether the
  state is still good before every save, so a NaN state never replaces the last good checkpoint
  (Keras still calls on_epoch_end after stop_training is set)."""

  def __init__(self):
    super().__init__()
    self.bad_step = None
    self.reason = ""

  @property
  def tripped(self):
    return self.bad_step is not None

  def trip(self, reason):
    if self.bad_step is None:
      self.bad_step = int(self.model.optimizer.iterations.numpy())
      self.reason = reason
    self.model.stop_training = True

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not np.isfinite(float(loss)):
      self.trip(f"the loss is {float(loss)}")


class CheckpointCallback(keras.callbacks.Callback):
  """Saves (model incl. support set, optimizer incl. step) every N steps and at each epoch end."""

  def __init__(self, model_dir, every_steps=0, keep=3, guard=None, stopper=None):
    super().__init__()
    self.model_dir = model_dir
    self.every_steps = every_steps
    self.keep = keep
    self.manager = None
    self.guard = guard  # a NonFiniteGuard: no save once it has tripped
    self.stopper = stopper  # a StopOnSignal: save at the step it stops training
    self._interval = None

  def on_train_begin(self, logs=None):
    if self.manager is None:
      # Crash safety: tf.train.CheckpointManager writes the shards into ckpt-N_temp/, merges them
      # into ckpt-N.{index,data}, and only then rewrites the `checkpoint` state file atomically
      # (temp file + rename), so a kill at any moment leaves the state file naming the previous
      # complete checkpoint. An orphaned ckpt-N_temp/ from such a kill is removed here.
      remove_orphaned_temp_dirs(self.model_dir)
      self.manager = tf.train.CheckpointManager(make_checkpoint(self.model), self.model_dir,
                                                max_to_keep=self.keep)
    if self.every_steps:
      self._interval = int(self.model.optimizer.iterations.numpy()) // self.every_steps

  def _save(self):
    if self.guard is not None:
      if self.guard.tripped:
        return
      if not state_is_finite(self.model):
        self.guard.trip("the weights or optimizer state became non-finite")
        return
    step = int(self.model.optimizer.iterations.numpy())
    if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
      return
    try:
      self.manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      # TensorFlow reports EFBIG as OutOfRangeError, which model.fit takes for the end of the
      # data and ends the epoch quietly: raise ours, which it does not catch.
      if is_disk_full(e):
        raise DiskFullError(disk_full_message(e, self.model_dir)) from None
      raise

  def on_train_batch_end(self, batch, logs=None):
    if self.stopper is not None and self.stopper.stopped_at is not None:
      self._save()
      return
    if self.every_steps:
      # Compare intervals, not `step % every == 0`: with steps_per_execution > 1 this callback
      # sees every k-th step only and an exact multiple could be skipped forever.
      step = int(self.model.optimizer.iterations.numpy())
      if self._interval is not None and step // self.every_steps > self._interval:
        self._save()
      self._interval = step // self.every_steps

  def on_epoch_end(self, epoch, logs=None):
    self._save()


class StopOnSignal(keras.callbacks.Callback):
  """SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) let the current step finish, then
  stop training; CheckpointCallback (after this one in the list) saves that step, and `pretrain`
  raises Preempted. A second signal of the same kind gets the default behaviour (immediate exit).

  Under MultiWorkerMirroredStrategy only some workers may receive the signal, so every step the
  workers agree through a collective whether any of them was asked to stop: all stop, and save,
  at the same step. With a single worker the step costs one attribute check."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, strategy=None):
    super().__init__()
    self.strategy = strategy
    self.requested = None  # the signal received, if any
    self.stopped_at = None  # the step training stopped after
    self._previous = {}
    self._agree = strategy is not None and distributed.in_multi_worker_mode(strategy)

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested == signum:
      self.uninstall()
      signal.raise_signal(signum)  # the second one: what it would have done without us
      return
    self.requested = signum
    logging.warning("%s received: stopping after the current step and saving a checkpoint (send "
                    "it again to exit at once)", signal.Signals(signum).name)

  def on_train_batch_end(self, batch, logs=None):
    wanted = self.requested or 0
    if self._agree:
      wanted = max(distributed.gather_ints(self.strategy, wanted))
      if wanted and not self.requested:
        self.requested = wanted  # another worker's signal
    if wanted:
      self.stopped_at = int(self.model.optimizer.iterations.numpy())
      self.model.stop_training = True


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXT = ("No space left", "Disk quota", "File too large")


def is_disk_full(error):
  """True for an OSError or a TensorFlow error caused by a full disk, a quota or a file-size
  limit (TensorFlow's file system layer reports errno only as text)."""
  if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
    return True
  return isinstance(error, tf.errors.OpError) and any(t in str(error) for t in DISK_FULL_TEXT)


def disk_full_message(error, model_dir):
  """One line for a write that failed on a full disk (or a quota, or a file-size limit)."""
  import re
  text = str(error)
  # TensorFlow's messages carry the file among graph details: keep the path under model_dir.
  paths = re.findall(re.escape(os.path.abspath(model_dir)) + r"[^\s:;,'\"]*", text)
  what = getattr(error, "filename", None) or (paths[0] if paths else "a file")
  reason = getattr(error, "strerror", None) or next(
      (t for t in DISK_FULL_TEXT if t in text), "no space left")
  latest = tf.train.latest_checkpoint(model_dir) if os.path.isdir(model_dir) else None
  kept = (f"the last good checkpoint {os.path.basename(latest)} is kept and a rerun resumes "
          "from it" if latest else "no checkpoint was written")
  return (f"--model_dir={model_dir}: writing {what} failed ({reason}); free space on its disk "
          f"or use another --model_dir; {kept}")


def remove_orphaned_temp_dirs(ckpt_dir):
  """Deletes ckpt-N_temp/ folders left by a process killed while writing checkpoint N (TF
  documents them as safe to remove; the `checkpoint` state file never names them)."""
  import shutil
  if not os.path.isdir(ckpt_dir):
    return
  for name in os.listdir(ckpt_dir):
    path = os.path.join(ckpt_dir, name)
    if name.startswith("ckpt-") and name.endswith("_temp") and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)


class TimingCallback(keras.callbacks.Callback):
  """Wall time of the training steps after the first (which includes tracing/compilation)."""

  def __init__(self):
    super().__init__()
    self.steps = 0
    self.seconds = 0.0
    self._t = None
    self.last_logs = {}

  def on_train_batch_begin(self, batch, logs=None):
    self._t = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.steps += 1
    if self.steps > 1:
      self.seconds += time.perf_counter() - self._t
    self.last_logs = dict(logs or {})


def keras_jit_compile(jit_compile, strategy):
  """The `jit_compile` to give model.compile for --jit_compile under `strategy`."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return False  # the TPU compiler compiles the replicated step with XLA anyway
  if jit_compile and strategy.num_replicas_in_sync > 1:
    raise ConfigError(
        f"--jit_compile with {strategy.num_replicas_in_sync} replicas: Keras 3 compiles the whole "
        "replicated step (strategy.run) as one XLA program, which cannot span the devices of "
        "MirroredStrategy/MultiWorkerMirroredStrategy (keras-team/keras#18145); drop "
        "--jit_compile, or use --strategy=tpu where XLA is always on")
  return jit_compile


def check_workers_agree(strategy, step):
  """Refuses to train when multi-worker replicas resumed from different checkpoints (their
  collectives would mix different steps or hang)."""
  if not distributed.in_multi_worker_mode(strategy):
    return
  steps = distributed.gather_ints(strategy, step)
  if len(set(steps)) > 1:
    raise ConfigError(
        f"workers resumed from different steps {steps} (in replica order): each worker restores "
        "from its own folder (chief: --model_dir, others: --model_dir/.workers/<task>), falling "
        "back to --model_dir; give every worker its folder back, use a --model_dir all workers "
        "share, or a new --model_dir to start over")


def pretrain(model, strategy, source, data_cfg, aug_cfg, train_cfg, optim_cfg, callbacks=()):
  """Compiles `model` (built in `strategy.scope()`), resumes from train_cfg.model_dir if it holds
  a checkpoint, and trains to the target step with model.fit. Returns a dict of figures."""
  global_batch = train_cfg.batch_size
  replicas = strategy.num_replicas_in_sync
  validate_batch(global_batch, model.support_set.size, replicas, model.nn_topk)
  spe = data_lib.steps_per_epoch(len(source), global_batch)
  if spe < 1:
    raise ConfigError(f"--batch_size={global_batch} is larger than the {len(source)} training "
                      "examples; lower it")
  total = train_cfg.train_steps or train_cfg.train_epochs * spe
  out_dir = distributed.worker_dir(train_cfg.model_dir, strategy)
  with strategy.scope():
    optimizer = build_optimizer(optim_cfg, model.trainable_variables, global_batch, total, spe)
    model.compile(optimizer=optimizer, jit_compile=keras_jit_compile(train_cfg.jit_compile,
                                                                     strategy),
                  steps_per_execution=train_cfg.steps_per_execution)
    # model.optimizer, not optimizer: under mixed_float16 compile wraps it in a
    # LossScaleOptimizer, whose loss scale is state to build and checkpoint too.
    model.optimizer.build(model.trainable_variables)
  restored = restore_latest(model, out_dir)
  if not restored and out_dir != train_cfg.model_dir:
    # A replaced worker with an empty private folder: the chief's checkpoints, if it can see them.
    restored = restore_latest(model, train_cfg.model_dir)
  start = int(model.optimizer.iterations.numpy())
  check_workers_agree(strategy, start)
  timing = TimingCallback()
  guard = NonFiniteGuard()  # first: it decides whether CheckpointCallback may save
  stopper = StopOnSignal(strategy)  # before CheckpointCallback, which saves the step it stops at
  cbs = [guard, stopper,
         CheckpointCallback(out_dir, train_cfg.checkpoint_every_steps, train_cfg.keep_checkpoints,
                            guard, stopper),
         keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), update_freq=max(1, spe // 10)),
         timing, *callbacks]
  step = start
  stopper.install()
  try:
    _fit_to(model, strategy, source, data_cfg, aug_cfg, train_cfg, cbs, guard, stopper, out_dir,
            step, total, spe)
  finally:
    stopper.uninstall()
  step = int(model.optimizer.iterations.numpy())
  logs = {k: float(v) for k, v in timing.last_logs.items()}
  return {
      "steps": step,
      "epochs": step / spe,
      "steps_per_epoch": spe,
      "resumed_from_step": start if restored else 0,
      "final_loss": logs.get("loss"),
      "nn_label_hit": logs.get("nn_label_hit") if source.has_labels and model.use_nn else None,
      "contrastive_acc": logs.get("contrastive_acc"),
      "nn_similarity": logs.get("nn_similarity"),
      "pairs_per_sec": (timing.steps - 1) * global_batch / timing.seconds
                       if timing.seconds > 0 else None,
  }


def _fit_to(model, strategy, source, data_cfg, aug_cfg, train_cfg, cbs, guard, stopper, out_dir,
            step, total, spe):
  """model.fit, an epoch range at a time, from `step` to `total`; raises when the guard tripped
  or a signal stopped training."""
  global_batch = train_cfg.batch_size
  while step < total:
    epoch = step // spe
    ds = data_lib.distributed_pretrain_dataset(strategy, source, aug_cfg, data_cfg.image_size,
                                               global_batch, train_cfg.seed, step)
    if step % spe or total - step < spe:
      # A partial epoch (a run resumed mid-epoch, or --train_steps not a multiple of the epoch).
      n = min(spe - step % spe, total - step)
      model.fit(ds, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=n,
                verbose=train_cfg.verbose, callbacks=cbs, shuffle=False)
    else:
      model.fit(ds, epochs=epoch + (total - step) // spe, initial_epoch=epoch,
                steps_per_epoch=spe, verbose=train_cfg.verbose, callbacks=cbs, shuffle=False)
    if guard.tripped:
      latest = tf.train.latest_checkpoint(out_dir)
      kept = (f"the last checkpoint with finite weights, {os.path.basename(latest)}, is kept in "
              f"{out_dir}" if latest else f"no checkpoint was written to {out_dir}")
      raise NonFiniteLossError(
          f"training stopped at step {guard.bad_step}: {guard.reason}; {kept}. Lower "
          "--learning_rate or raise --warmup_epochs, or check the input data for NaN/Inf; a "
          "rerun resumes from the last checkpoint")
    if stopper.stopped_at is not None:
      latest = tf.train.latest_checkpoint(out_dir)
      raise Preempted(
          f"{signal.Signals(stopper.requested).name} at step {stopper.stopped_at}: "
          f"{os.path.basename(latest or 'no checkpoint')} saved in {out_dir}; the same command "
          "resumes from it", stopper.requested)
    step = int(model.optimizer.iterations.numpy())
