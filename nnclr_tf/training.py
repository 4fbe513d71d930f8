"""Pretraining with model.fit: optimizer and schedule, checkpoints that resume, timing."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import checkpoints, distributed
from nnclr_tf import data as data_lib
from nnclr_tf.checks import check_batch
from nnclr_tf.config import OptimConfig
from nnclr_tf.errors import ConfigError, NonFiniteLossError, Preempted
from nnclr_tf.lars import LARS, is_excluded
from nnclr_tf.results import TrainingFigures
from nnclr_tf.schedules import WarmupCosine, scaled_learning_rate
from nnclr_tf.sgd import CoupledSGD


def build_optimizer(cfg: OptimConfig, variables, global_batch, total_steps, steps_per_epoch):
  """The optimizer `cfg` names (validated when the OptimConfig was made) over the warm-up +
  cosine schedule of the run."""
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
  else:  # adamw
    opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
  if cfg.weight_decay:
    opt.exclude_from_weight_decay(var_list=no_decay)  # biases and BN, by structure
  return opt


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


def pretrain(model, strategy, source, data_cfg, aug_cfg, train_cfg, optim_cfg,
             callbacks=()) -> TrainingFigures:
  """Compiles `model` (built in `strategy.scope()`), resumes from train_cfg.model_dir if it holds
  a checkpoint, and trains to the target step with model.fit. Returns a dict of figures."""
  global_batch = train_cfg.batch_size
  replicas = strategy.num_replicas_in_sync
  check_batch(global_batch, model.support_set.size, replicas, model.config.nn_topk, len(source))
  spe = data_lib.steps_per_epoch(len(source), global_batch)
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
  restored = checkpoints.restore_latest(model, out_dir)
  if not restored and out_dir != train_cfg.model_dir:
    # A replaced worker with an empty private folder: the chief's checkpoints, if it can see them.
    restored = checkpoints.restore_latest(model, train_cfg.model_dir)
  start = int(model.optimizer.iterations.numpy())
  check_workers_agree(strategy, start)
  timing = TimingCallback()
  guard = NonFiniteGuard()  # first: it decides whether CheckpointCallback may save
  stopper = StopOnSignal(strategy)  # before CheckpointCallback, which saves the step it stops at
  cbs = [guard, stopper,
         checkpoints.CheckpointCallback(out_dir, train_cfg.checkpoint_every_steps,
                                        train_cfg.keep_checkpoints, guard, stopper,
                                        train_cfg.keep_checkpoint_every_steps),
         keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), update_freq=max(1, spe // 10)),
         timing, *callbacks]
  step = start
  stopper.install()
  try:
    def stream(at):
      return data_lib.distributed_pretrain_dataset(strategy, source, aug_cfg, data_cfg.image_size,
                                                   global_batch, train_cfg.seed, at)

    fit_to(model, stream, cbs, guard, stopper, out_dir, step, total, spe, train_cfg.verbose)
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
      "nn_label_hit": logs.get("nn_label_hit") if source.has_labels and model.config.use_nn
                       else None,
      "contrastive_acc": logs.get("contrastive_acc"),
      "nn_similarity": logs.get("nn_similarity"),
      "pairs_per_sec": (timing.steps - 1) * global_batch / timing.seconds
                       if timing.seconds > 0 else None,
  }


def fit_to(model, dataset_at, cbs, guard, stopper, out_dir, step, total, spe, verbose,
           hint="Lower --learning_rate or raise --warmup_epochs"):
  """model.fit, an epoch range at a time, from `step` to `total` on `dataset_at(step)` (a stream
  starting at that step); raises when the guard tripped or a signal stopped training. `hint`:
  what to change when the loss goes non-finite."""
  while step < total:
    epoch = step // spe
    ds = dataset_at(step)
    if step % spe or total - step < spe:
      # A partial epoch (a run resumed mid-epoch, or --train_steps not a multiple of the epoch).
      n = min(spe - step % spe, total - step)
      model.fit(ds, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=n,
                verbose=verbose, callbacks=cbs, shuffle=False)
    else:
      model.fit(ds, epochs=epoch + (total - step) // spe, initial_epoch=epoch,
                steps_per_epoch=spe, verbose=verbose, callbacks=cbs, shuffle=False)
    if guard.tripped:
      latest = checkpoints.latest_checkpoint(out_dir)
      kept = (f"the last checkpoint with finite weights, {os.path.basename(latest)}, is kept in "
              f"{out_dir}" if latest else f"no checkpoint was written to {out_dir}")
      raise NonFiniteLossError(
          f"training stopped at step {guard.bad_step}: {guard.reason}; {kept}. {hint}, or check "
          "the input data for NaN/Inf; a rerun resumes from the last checkpoint")
    if stopper.stopped_at is not None:
      latest = checkpoints.latest_checkpoint(out_dir)
      raise Preempted(
          f"{signal.Signals(stopper.requested).name} at step {stopper.stopped_at}: "
          f"{os.path.basename(latest or 'no checkpoint')} saved in {out_dir}; the same command "
          "resumes from it", stopper.requested)
    step = int(model.optimizer.iterations.numpy())
