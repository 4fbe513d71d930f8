"""Every TensorFlow checkpoint operation of a model_dir, in one place: find, restore, verify,
save during training.

A checkpoint holds the model (incl. the support set and its pointer) and the optimizer (incl. its
step), so a restore resumes training exactly; evaluation and export read the model's part only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import keras
import tensorflow as tf

from nnclr_tf import model_dir as md
from nnclr_tf.errors import DiskFullError, ModelDirError, disk_full_message, is_disk_full


def latest_checkpoint(model_dir) -> str | None:
  """The newest checkpoint on disk, not verified (newest_intact verifies)."""
  found = candidates(model_dir)
  return found[0] if found else None


def checkpoint_step(checkpoint) -> int:
  """N of a `.../ckpt-N` checkpoint path (0 for None)."""
  tail = (checkpoint or "").rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def checkpoint_at(model_dir, step):
  """The latest checkpoint if it holds `step` (the model's state after pretraining), else None."""
  latest = latest_checkpoint(model_dir)
  return latest if latest and checkpoint_step(latest) == step else None


def require_checkpoint(model_dir):
  """The newest intact checkpoint of model_dir (newest_intact), or one ModelDirError line."""
  chosen = newest_intact(model_dir)
  if not chosen:
    raise ModelDirError(f"--model_dir={model_dir} holds no checkpoint; run --mode=pretrain first")
  return chosen


def candidates(model_dir) -> list[str]:
  """Every checkpoint a restore may take, newest first: those the `checkpoint` state file names
  (all files on disk when it is missing or does not parse) and the milestones.

  A `ckpt-N.index` the state file does not name (a save killed before the state file was
  rewritten) is passed over, as tf.train.latest_checkpoint does, while the state file is sound."""
  named = state_file_paths(model_dir)
  if named is None and tf.io.gfile.exists(os.path.join(model_dir, "checkpoint")):
    md.warn_once(os.path.join(model_dir, "checkpoint"),
                 f"--model_dir={model_dir}: its `checkpoint` state file does not parse; the "
                 "checkpoints on disk are read instead (pretraining keeps it as "
                 "checkpoint.damaged and writes it anew)")
  found = {s: p for s, p in available_checkpoints(model_dir).items()
           if named is None or os.path.basename(os.path.dirname(p)) == MILESTONES}
  for path in named or []:
    if tf.io.gfile.exists(path + ".index"):
      found[checkpoint_step(path)] = path
  return [found[s] for s in sorted(found, reverse=True)]


_STATE_LINE = re.compile(r'(all_)?model_checkpoint_paths?: "([^"]+)"$'
                         r"|(all_model_checkpoint_timestamps|last_preserved_timestamp): "
                         r"[0-9.e+-]+$")


def state_file_paths(model_dir) -> list[str] | None:
  """The checkpoint prefixes the `checkpoint` state file lists, oldest first; None when it is
  missing or does not parse (read here, quietly: tf.train.get_checkpoint_state logs two
  warnings for a garbled one and raises for an empty one)."""
  try:
    with tf.io.gfile.GFile(os.path.join(model_dir, "checkpoint")) as f:
      lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  except (tf.errors.OpError, UnicodeDecodeError):
    return None
  matches = [_STATE_LINE.fullmatch(line) for line in lines]
  if not lines or not all(matches) or not any(m.group(2) and not m.group(1) for m in matches):
    return None
  paths = [m.group(2) for m in matches if m.group(1)] or [
      m.group(2) for m in matches if m.group(2)]
  return [p if os.path.isabs(p) or "://" in p else os.path.join(model_dir, p) for p in paths]


_VERIFIED: dict = {}  # (prefix, files' sizes and times) -> damage(): a file rewritten is re-read


def damage(prefix) -> str | None:
  """Why the checkpoint `prefix` cannot be restored, or None when every tensor reads back.

  The bundle's index holds a CRC32C of every tensor, which the reader checks: reading them all
  finds a truncated, emptied or garbled data shard or index before any variable is assigned (a
  restore would fail half-way, or, for a short read, end the process with an IndexError)."""
  try:
    files = tuple(_stamp(f) for f in sorted(tf.io.gfile.glob(prefix + ".*")))
  except (tf.errors.OpError, OSError):
    files = ()
  key = (prefix, files)
  if key not in _VERIFIED:
    try:
      reader = tf.train.load_checkpoint(prefix)
      for name in reader.get_variable_to_dtype_map():
        reader.get_tensor(name)
      reason = None
    except Exception as e:  # noqa: BLE001  any failure to read back is damage
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if len(_VERIFIED) > 64:
      _VERIFIED.clear()
    _VERIFIED[key] = reason
  return _VERIFIED[key]


def _stamp(file_path):
  """(path, size, modification time, inode): os.stat's nanoseconds for a local file (gfile.stat
  rounds to whole seconds, which would miss a rewrite within the second)."""
  if "://" not in file_path:
    st = os.stat(file_path)
    return file_path, st.st_size, st.st_mtime_ns, st.st_ino
  st = tf.io.gfile.stat(file_path)
  return file_path, st.length, st.mtime_nsec, 0


def newest_intact(model_dir, warn=True) -> str | None:
  """The newest checkpoint of model_dir that reads back whole (None: model_dir has none).

  A damaged one is left on disk as it is and named in one warning line (a resumed run writes
  that step again when it gets there); with checkpoints on disk but none intact, one
  ModelDirError line names them."""
  damaged = []
  for prefix in candidates(model_dir):
    reason = damage(prefix)
    if reason is not None and not tf.io.gfile.exists(prefix + ".index"):
      continue  # deleted while it was read (the trainer keeps --keep_checkpoints): not damage
    if reason is None:
      if warn and damaged:
        logging.warning("--model_dir=%s: %s; left on disk as %s, and %s, the newest intact "
                        "checkpoint, is used", model_dir, "; ".join(
                            f"{os.path.basename(p)} is damaged ({r})" for p, r in damaged),
                        "it is" if len(damaged) == 1 else "they are", os.path.basename(prefix))
      return prefix
    damaged.append((prefix, reason))
  if damaged:
    raise no_intact_error(model_dir, damaged)
  return None


def no_intact_error(model_dir, damaged):
  names = ", ".join(f"{os.path.relpath(p, model_dir)}.* ({r})" for p, r in damaged)
  return ModelDirError(f"--model_dir={model_dir} holds no intact checkpoint: {names}; restore "
                       "the files from a copy, or use a new --model_dir to start over")


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
      return _intact(found[int(which)], f"--checkpoint={which}")
    have = (f"it has steps {', '.join(str(s) for s in found)}" if found
            else "it holds no checkpoint (run --mode=pretrain first)")
    raise ModelDirError(f"--checkpoint={which}: --model_dir={model_dir} has no checkpoint of step "
                        f"{which}; {have} (--keep_checkpoint_every_steps keeps milestones)")
  if tf.io.gfile.exists(which + ".index"):
    return _intact(which, f"--checkpoint={which}")
  if tf.io.gfile.isdir(which) and candidates(which):
    return newest_intact(which)
  raise ModelDirError(f"--checkpoint={which} is neither a step of --model_dir={model_dir} nor a "
                      f"checkpoint ({which}.index does not exist); give a step or a .../ckpt-N "
                      "path")


def _intact(prefix, flag):
  reason = damage(prefix)
  if reason:
    raise ModelDirError(f"{flag}: {prefix} is damaged ({reason}); give another step or path, "
                        "or leave the flag out for the newest intact checkpoint")
  return prefix


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
  try:
    latest = newest_intact(model_dir, warn=False)
  except ModelDirError:
    return None  # nothing readable: the restore reports it
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


def restore_latest(model, ckpt_dir, make=make_checkpoint):
  """Restores the newest checkpoint in ckpt_dir, if any. Returns its path or None.

  The newest intact one (newest_intact: a damaged newer one is named in a warning line). A
  checkpoint of a different architecture is refused with a ConfigError (nothing is written).
  `make(model)`: the tf.train.Checkpoint of what is saved (CheckpointCallback's `make`)."""
  latest = newest_intact(ckpt_dir)
  if latest:
    try:
      make(model).restore(latest).assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      raise _does_not_fit(ckpt_dir, latest, e) from None
  return latest


def check_checkpoint_fits(model, ckpt_dir):
  """Raises ConfigError when ckpt_dir's newest checkpoint is not of `model`'s architecture (it
  loads the model's part of the checkpoint into `model`, which a resume does anyway)."""
  latest = newest_intact(ckpt_dir, warn=False)
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
               milestone_every_steps=0, make=make_checkpoint):
    super().__init__()
    self.model_dir = model_dir
    self.make = make  # model -> the tf.train.Checkpoint saved (default: model and optimizer)
    self.every_steps = every_steps
    self.keep = keep
    self.milestone_every_steps = milestone_every_steps
    self._milestone_interval = None
    self.manager = None
    self.guard = guard  # a NonFiniteGuard: no save once it has tripped
    self.stopper = stopper  # a StopOnSignal: save at the step it stops training
    self._interval = None
    # The step this process saved last: not the state file's newest, which may be a damaged
    # checkpoint the restore passed over and which this run must write again.
    self._saved_step = None

  def on_train_begin(self, logs=None):
    if self.manager is None:
      # Crash safety: tf.train.CheckpointManager writes the shards into ckpt-N_temp/, merges them
      # into ckpt-N.{index,data}, and only then rewrites the `checkpoint` state file atomically
      # (temp file + rename), so a kill at any moment leaves the state file naming the previous
      # complete checkpoint. An orphaned ckpt-N_temp/ from such a kill is removed here.
      remove_orphaned_temp_dirs(self.model_dir)
      repair_state_file(self.model_dir)
      self.manager = tf.train.CheckpointManager(self.make(self.model), self.model_dir,
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
        save_milestone(self.model, self.model_dir, step, self.make)
      if self._saved_step == step:
        return
      self.manager.save(checkpoint_number=step)
      self._saved_step = step
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


def save_milestone(model, model_dir, step, make=make_checkpoint):
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
  ckpt = make(model)
  ckpt.save_counter  # noqa: B018  (created, so it is written: a strict restore expects it)
  ckpt.write(os.path.join(partial, f"ckpt-{int(step)}"))
  names = sorted(tf.io.gfile.listdir(partial), key=lambda n: n.endswith(".index"))
  for name in names:  # the data shards first: the .index is what makes a milestone exist
    tf.io.gfile.rename(os.path.join(partial, name), os.path.join(folder, name), overwrite=True)
  tf.io.gfile.rmtree(partial)
  return final


def repair_state_file(model_dir):
  """A `checkpoint` state file that does not parse is kept as `checkpoint.damaged` and written
  anew from the checkpoints on disk (tf.train.CheckpointManager would otherwise start from an
  empty list, or raise on an empty file; the state file only lists files, all still there)."""
  state = os.path.join(model_dir, "checkpoint")
  if not tf.io.gfile.exists(state) or state_file_paths(model_dir) is not None:
    return
  kept = [p for p in candidates(model_dir)  # not the milestones, which no manager deletes
          if os.path.basename(os.path.dirname(p)) != MILESTONES]
  tf.io.gfile.rename(state, state + ".damaged", overwrite=True)
  if kept:
    # As CheckpointManager writes it: paths relative to model_dir, oldest first, then the newest.
    names = [os.path.basename(p) for p in kept[::-1]]
    text = f'model_checkpoint_path: "{names[-1]}"\n' + "".join(
        f'all_model_checkpoint_paths: "{n}"\n' for n in names)
    with tf.io.gfile.GFile(state + ".tmp", "w") as f:
      f.write(text)
    tf.io.gfile.rename(state + ".tmp", state, overwrite=True)
  # candidates() above named the damage in a warning line.
  logging.info("--model_dir=%s: the `checkpoint` state file is kept as checkpoint.damaged and "
               "written anew from the %d checkpoint(s) on disk", model_dir, len(kept))


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
