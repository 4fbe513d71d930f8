"""Every TensorFlow checkpoint operation of a model_dir, in one place: find, restore, verify,
save during training.

A checkpoint holds the model (incl. the support set and its pointer) and the optimizer (incl. its
step), so a restore resumes training exactly; evaluation and export read the model's part only.
"""

from __future__ import annotations

import os
import shutil

import keras
import tensorflow as tf

from nnclr_tf.errors import DiskFullError, ModelDirError, disk_full_message, is_disk_full


def latest_checkpoint(model_dir) -> str | None:
  return tf.train.latest_checkpoint(model_dir)


def checkpoint_step(checkpoint) -> int:
  """N of a `.../ckpt-N` checkpoint path (0 for None)."""
  tail = (checkpoint or "").rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def checkpoint_at(model_dir, step):
  """The latest checkpoint if it holds `step` (the model's state after pretraining), else None."""
  latest = latest_checkpoint(model_dir)
  return latest if latest and checkpoint_step(latest) == step else None


def require_checkpoint(model_dir):
  latest = latest_checkpoint(model_dir)
  if not latest:
    raise ModelDirError(f"--model_dir={model_dir} holds no checkpoint; run --mode=pretrain first")
  return latest


MILESTONES = "milestones"  # model_dir/milestones/ckpt-N: --keep_checkpoint_every_steps


def available_checkpoints(model_dir) -> dict[int, str]:
  """{step: checkpoint path} of the complete checkpoints in model_dir (the kept ones) and in
  model_dir/milestones; a step in both gives the model_dir's."""
  found = {}
  for folder in (os.path.join(model_dir, MILESTONES), model_dir):
    for index in tf.io.gfile.glob(os.path.join(folder, "ckpt-*.index")):
      prefix = index[:-len(".index")]
      if checkpoint_step(prefix):
        found[checkpoint_step(prefix)] = prefix
  return dict(sorted(found.items()))


def resolve_checkpoint(model_dir, which="") -> str:
  """The checkpoint `--checkpoint` names: "" the newest of model_dir, "N" the one of step N (kept
  or a milestone), anything else a checkpoint path (a prefix .../ckpt-N, or a folder holding
  checkpoints: its newest). One ModelDirError line, listing the steps there are, otherwise."""
  which = str(which or "").strip()
  if not which:
    return require_checkpoint(model_dir)
  if which.isdigit():
    found = available_checkpoints(model_dir)
    if int(which) in found:
      return found[int(which)]
    have = (f"it has steps {', '.join(str(s) for s in found)}" if found
            else "it holds no checkpoint (run --mode=pretrain first)")
    raise ModelDirError(f"--checkpoint={which}: --model_dir={model_dir} has no checkpoint of step "
                        f"{which}; {have} (--keep_checkpoint_every_steps keeps milestones)")
  if tf.io.gfile.exists(which + ".index"):
    return which
  if tf.io.gfile.isdir(which) and latest_checkpoint(which):
    return latest_checkpoint(which)
  raise ModelDirError(f"--checkpoint={which} is neither a step of --model_dir={model_dir} nor a "
                      f"checkpoint ({which}.index does not exist); give a step or a .../ckpt-N "
                      "path")


def restore(model, checkpoint, strict=False):
  """Loads the model's part of `checkpoint` (the optimizer is not needed to evaluate or export);
  strict: every variable of the model must be in the checkpoint."""
  status = tf.train.Checkpoint(model=model).restore(checkpoint)
  if strict:
    status.assert_existing_objects_matched()
  status.expect_partial()
  return checkpoint


def online_probe_classes(model_dir):
  """The online probe's class count in model_dir's newest checkpoint (0: none), or None when
  there is no readable checkpoint."""
  latest = latest_checkpoint(model_dir)
  if not latest:
    return None
  try:
    kernels = [shape for name, shape in tf.train.list_variables(latest)
               if name.startswith("model/online_probe/") and "kernel" in name]
  except (tf.errors.OpError, ValueError):
    return None  # an unreadable checkpoint: the restore reports it
  return int(kernels[0][-1]) if kernels else 0


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


class CheckpointCallback(keras.callbacks.Callback):
  """Saves (model incl. support set, optimizer incl. step) every N steps and at each epoch end."""

  def __init__(self, model_dir, every_steps=0, keep=3, guard=None, stopper=None,
               milestone_every_steps=0):
    super().__init__()
    self.model_dir = model_dir
    self.every_steps = every_steps
    self.keep = keep
    self.milestone_every_steps = milestone_every_steps
    self._milestone_interval = None
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
    if self.milestone_every_steps:
      self._milestone_interval = (int(self.model.optimizer.iterations.numpy())
                                  // self.milestone_every_steps)

  def _save(self, milestone=False):
    if self.guard is not None:
      if self.guard.tripped:
        return
      if not state_is_finite(self.model):
        self.guard.trip("the weights or optimizer state became non-finite")
        return
    step = int(self.model.optimizer.iterations.numpy())
    try:
      if milestone:
        save_milestone(self.model, self.model_dir, step)
      if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
        return
      self.manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      # TensorFlow reports EFBIG as OutOfRangeError, which model.fit takes for the end of the
      # data and ends the epoch quietly: raise ours, which it does not catch.
      if is_disk_full(e):
        raise DiskFullError(disk_full_message(e, self.model_dir)) from None
      raise

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    milestone = False
    if self.milestone_every_steps:
      milestone = (self._milestone_interval is not None
                   and step // self.milestone_every_steps > self._milestone_interval)
      self._milestone_interval = step // self.milestone_every_steps
    if self.stopper is not None and self.stopper.stopped_at is not None:
      self._save(milestone)
      return
    due = milestone
    if self.every_steps:
      # Compare intervals, not `step % every == 0`: with steps_per_execution > 1 this callback
      # sees every k-th step only and an exact multiple could be skipped forever.
      due = due or (self._interval is not None and step // self.every_steps > self._interval)
      self._interval = step // self.every_steps
    if due:
      self._save(milestone)

  def on_epoch_end(self, epoch, logs=None):
    self._save()


def save_milestone(model, model_dir, step):
  """model_dir/milestones/ckpt-<step>, kept for good (no CheckpointManager deletes it): written
  into a temporary folder, then moved into place index last, so a kill leaves either a complete
  milestone or none (a stray `.ckpt-N.partial/` is removed by the next save)."""
  folder = os.path.join(model_dir, MILESTONES)
  final = os.path.join(folder, f"ckpt-{int(step)}")
  if tf.io.gfile.exists(final + ".index"):
    return final
  partial = os.path.join(folder, f".ckpt-{int(step)}.partial")
  if tf.io.gfile.exists(partial):
    tf.io.gfile.rmtree(partial)
  tf.io.gfile.makedirs(partial)
  ckpt = make_checkpoint(model)
  ckpt.save_counter  # noqa: B018  (created, so it is written: a strict restore expects it)
  ckpt.write(os.path.join(partial, f"ckpt-{int(step)}"))
  names = sorted(tf.io.gfile.listdir(partial), key=lambda n: n.endswith(".index"))
  for name in names:  # the data shards first: the .index is what makes a milestone exist
    tf.io.gfile.rename(os.path.join(partial, name), os.path.join(folder, name), overwrite=True)
  tf.io.gfile.rmtree(partial)
  return final


def remove_orphaned_temp_dirs(ckpt_dir):
  """Deletes ckpt-N_temp/ folders left by a process killed while writing checkpoint N (TF
  documents them as safe to remove; the `checkpoint` state file never names them), and
  milestones/.ckpt-N.partial/ folders of milestones a kill interrupted."""
  if not os.path.isdir(ckpt_dir):
    return
  for name in os.listdir(ckpt_dir):
    path = os.path.join(ckpt_dir, name)
    if name.startswith("ckpt-") and name.endswith("_temp") and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
  milestones = os.path.join(ckpt_dir, MILESTONES)
  if os.path.isdir(milestones):  # and milestones a kill interrupted (save_milestone)
    for name in os.listdir(milestones):
      if name.startswith(".ckpt-") and name.endswith(".partial"):
        shutil.rmtree(os.path.join(milestones, name), ignore_errors=True)
