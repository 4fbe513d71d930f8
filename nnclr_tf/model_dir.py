"""The model_dir's on-disk contract, in one place.

  model_config.json        the architecture (NNCLR.get_config() less the online probe); a
                           model_dir holding another architecture is refused
  flags.txt                the resolved flags of the last run that wrote here
  checkpoint, ckpt-N.*     tf.train.CheckpointManager (model incl. support set, optimizer, step);
                           other workers of a multi-worker run: .workers/worker_<i>/
  curves.csv, logs/        training curves (CSV, TensorBoard)
  features/                feature cache of an encoder (kNN, linear_eval, plots)
  plots/                   retrieval grid, embedding map, training curves
  linear_probe/probe.npz   linear_eval's probe (what the classifier export serves)
  linear_probe/sgd/<ckpt-N>-<hash>/   --linear_protocol=sgd: the head's checkpoints (resume)
  export/<encoder|classifier>/<version>/   TF Serving exports (--export_base elsewhere)
  <mode>_results.json      each mode's figures: pretrain, knn, linear_eval, finetune, export
  run.lock                 held while pretraining writes here (pid, host, start, mode)

Every file is written by temp file + rename, so a kill leaves the previous version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from nnclr_tf import cluster
from nnclr_tf.errors import ModelDirError, ModelDirLockedError
from nnclr_tf.model_config import architecture

MODEL_CONFIG = "model_config.json"
FLAGS_FILE = "flags.txt"
CURVES = "curves.csv"
LOGS = "logs"
FEATURES = "features"
PLOTS = "plots"
PROBE_FILE = os.path.join("linear_probe", "probe.npz")
EXPORT = "export"
LOCK = "run.lock"
RESULTS = {"pretrain": "pretrain_results.json", "knn_eval": "knn_results.json",
           "linear_eval": "linear_eval_results.json", "finetune": "finetune_results.json",
           "export": "export_results.json"}


def path(model_dir, name):
  return os.path.join(model_dir, name)


# --- files -------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(file_path):
  """Yields a temporary path beside `file_path` to write to; when the block succeeds it replaces
  `file_path` in one rename, so a reader (or a kill) never sees a half-written file. The one
  atomic writer of the project: JSON, CSV, NPZ, PNG alike. The temporary name keeps the
  extension, for writers that pick the format from it (np.savez, matplotlib)."""
  head, tail = os.path.split(file_path)
  remove_orphans(head or ".")
  # A private name (mkstemp): several workers may write the same file at once.
  fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=f"-{tail}", dir=head or ".")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, file_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def temp_prefix(kind=""):
  """`.tmp-<host>-<pid>-[<kind>-]`: a temporary file or folder names its writer, so the next
  writer can tell one a kill left (its pid gone on this host) from one being written now."""
  return f".tmp-{socket.gethostname()}-{os.getpid()}-" + (f"{kind}-" if kind else "")


def remove_orphans(folder):
  """Removes the temporary files and folders in `folder` whose writer, on this host, is no
  longer running (a kill mid-write); those of live writers, and of other hosts, are left."""
  mine = f".tmp-{socket.gethostname()}-"
  try:
    names = os.listdir(folder)
  except OSError:
    return
  for name in names:
    pid = name[len(mine):].split("-", 1)[0] if name.startswith(mine) else ""
    if not pid.isdigit() or pid_alive(int(pid)):
      continue
    target = os.path.join(folder, name)
    try:
      if os.path.isdir(target):
        shutil.rmtree(target, ignore_errors=True)
      else:
        os.remove(target)
    except OSError:
      pass  # another writer removed it first


def write_text(file_path, text):
  with atomic_path(file_path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_bytes(file_path, data):
  with atomic_path(file_path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_json(file_path, obj):
  write_text(file_path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(file_path):
  """The JSON object at `file_path`, or {} when it is missing or unreadable."""
  try:
    with open(file_path) as f:
      obj = json.load(f)
    return obj if isinstance(obj, dict) else {}
  except (OSError, ValueError):
    return {}


def json_damage(file_path):
  """(object, reason): the JSON object at `file_path` and "" when it is one; None and "" when
  the file is missing; None and why when it is there but damaged (truncated, emptied, garbled)."""
  try:
    with open(file_path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    return None, ""
  except OSError as e:
    return None, e.strerror or str(e)
  if not raw.strip():
    return None, "empty"
  try:
    obj = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    return None, "not UTF-8 text"
  except ValueError as e:
    return None, f"not JSON: {e}"
  if not isinstance(obj, dict):
    return None, "not a JSON object"
  return obj, ""


def results_path(model_dir, mode):
  return path(model_dir, RESULTS[mode])


_WARNED: set = set()  # (path, text) of the damage warnings given


def read_results(model_dir, mode, damaged="error", consequence="") -> Any:
  """`<mode>_results.json` ({} when missing): the mode's results.RESULTS dict. A damaged one is
  never taken for "no results" silently: damaged="error" (the caller would write over it, or
  needs what it records) raises one ModelDirError line; "warn" logs one warning line (once),
  with `consequence`, what the caller does without it, and gives {}."""
  file_path = results_path(model_dir, mode)
  obj, reason = json_damage(file_path)
  if obj is not None or not reason:
    return obj or {}
  if damaged == "error":
    raise ModelDirError(f"{file_path} is damaged ({reason}); it holds the figures of earlier "
                        f"--mode={mode} runs, which this run would write over: restore it from a "
                        "copy, or delete it to start the record anew")
  warn_once(file_path, f"{file_path} is damaged ({reason}); {consequence} (it is left as it is; "
                       f"--mode={mode} writes it anew)")
  return {}


def warn_once(file_path, text):
  """logging.warning(text), once per process for this file and text: a poller (the continuous
  evaluator) or a loop of readers names a damaged file once, not on every look."""
  key = (os.path.abspath(file_path), text)
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("%s", text)


def write_results(model_dir, mode, results):
  write_json(results_path(model_dir, mode), results)
  return results


def write_flags(model_dir, text):
  write_text(path(model_dir, FLAGS_FILE), text)


# --- the recorded architecture (model_config.architecture) ------------------------------------

def has_checkpoint(model_dir):
  return os.path.exists(path(model_dir, "checkpoint"))


def prepare(model_dir, model_config, checkpoint_checked=False):
  """Creates model_dir, refuses one that holds a different architecture, records the config.

  A model_dir with a checkpoint but no model_config.json (written by the Python API) gets one
  only when the caller has checked that the checkpoint fits the model
  (checkpoints.check_checkpoint_fits), `checkpoint_checked`."""
  model_config = architecture(model_config)
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = path(model_dir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ModelDirError(f"--model_dir={model_dir} is not writable ({e.strerror}); choose "
                        "another") from None
  config_path = path(model_dir, MODEL_CONFIG)
  if os.path.exists(config_path):
    old = architecture(recorded_model_config(model_dir))
    # Keras numbers model names per process (nnclr, nnclr_1, ...): not part of the architecture.
    diff = sorted(k for k in set(old) | set(model_config)
                  if k != "name" and old.get(k) != model_config.get(k))
    if diff:
      raise ModelDirError(
          f"--model_dir={model_dir} holds a model with different {', '.join(diff)} "
          f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use a new --model_dir or the "
          "same flags")
  elif checkpoint_checked or not has_checkpoint(model_dir):
    write_json(config_path, model_config)


def recorded_model_config(model_dir):
  """model_config.json's architecture ({} without one); one ModelDirError line when it is there
  but damaged (truncated, emptied, garbled): it is the record that guards the checkpoints'
  architecture, so it is never rewritten over."""
  obj, reason = json_damage(path(model_dir, MODEL_CONFIG))
  if obj:
    return obj
  if obj is None and not reason:
    return {}
  reason = reason or "not a JSON object of the model's settings"
  raise ModelDirError(f"--model_dir={model_dir}: {MODEL_CONFIG} is damaged ({reason}); it records "
                      "the architecture of the checkpoints there: restore it from a copy, or "
                      "delete it and rerun --mode=pretrain, which records it anew once the "
                      "newest checkpoint is checked to fit the flags")


# --- a finished pretraining run ----------------------------------------------------------------

def target_steps(train_cfg, recorded):
  """The step a run trains to, if it can be known before the data is loaded (from the steps per
  epoch a finished run recorded at the same global batch), else None."""
  if train_cfg.train_steps:
    return train_cfg.train_steps
  if recorded.get("global_batch") == train_cfg.batch_size and recorded.get("steps_per_epoch"):
    return train_cfg.train_epochs * int(recorded["steps_per_epoch"])
  return None


def evaluated(recorded):
  return recorded.get("knn_top1") is not None or bool(recorded.get("knn_skipped"))


def plots_exist(recorded):
  paths = recorded.get("plots") or {}
  return bool(paths) and all(os.path.exists(p) for p in paths.values())


def merge_results(recorded, results) -> Any:
  """New figures over the recorded ones of the same step; a recorded figure is never replaced by
  None (a rerun that trained nothing has no loss or speed of its own)."""
  if recorded.get("steps") != results.get("steps"):
    return results
  merged = dict(recorded)
  merged.update({k: v for k, v in results.items() if v is not None or k not in recorded})
  return merged


PRETRAIN_FIGURES = ("steps", "epochs", "final_loss", "nn_label_hit", "contrastive_acc",
                    "nn_similarity", "online_probe_acc", "knn_top1", "knn_top5",
                    "knn_top1_random_init", "knn_k", "global_batch", "train_examples")


def export_metadata(model_dir, step, image_size=None, results=None, checkpoint=None, **extra):
  """What `assets.extra/nnclr_tf.json` records of an export's origin: the checkpoint (step and
  path: `checkpoint`, default model_dir/ckpt-<step>), model_dir, the architecture
  (model_config.json), the serving preprocessing, and the pretraining figures recorded for this
  checkpoint (`results`, or pretrain_results.json when it is of the same step); `extra` is added
  as is (the classifier's probe figures)."""
  ckpt = checkpoint or path(model_dir, f"ckpt-{int(step)}")
  meta = {"checkpoint_step": int(step), "model_dir": os.path.abspath(model_dir),
          "checkpoint": os.path.abspath(ckpt),
          "model_config": recorded_model_config(model_dir)}
  if image_size:
    meta["image_size"] = int(image_size)
    meta["preprocessing"] = {
        "input": "RGB images, any size (uint8 [N, H, W, 3] or encoded bytes)",
        "scale": "uint8 / 255 -> float in [0, 1]",
        "crop_fraction": 1.0,
        "resize": f"whole image to {int(image_size)}x{int(image_size)}, bilinear, antialiased, "
                  "aspect ratio not kept",
        "normalisation": "inside the backbone (per-channel standardisation)"}
  if results is None:
    recorded = read_results(model_dir, "pretrain", damaged="warn",
                            consequence="the export's metadata carries no pretraining figures")
    results = recorded if recorded.get("steps") == int(step) else {}
  meta["pretraining"] = {k: results[k] for k in PRETRAIN_FIGURES if results.get(k) is not None}
  meta.update(extra)
  return meta


# --- one run per model_dir ---------------------------------------------------------------------

def pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's live process
  return True


_HELD: dict[str, int] = {}  # absolute lock path -> how many nested holders in this process


class RunLock:
  """`model_dir/run.lock`, created atomically (O_CREAT | O_EXCL) with the holder's pid, host,
  start time and mode, removed on release. A second run finds it and stops with
  ModelDirLockedError naming the holder; a lock whose pid is dead on this host (a kill -9, a
  reboot) is taken over with a warning. Re-entrant within a process (the CLI and the experiment
  function it calls both take it). A lock held from another host cannot be checked: it stands
  until that run ends or someone deletes the file."""

  def __init__(self, model_dir, mode="pretrain"):
    self.model_dir = model_dir
    self.mode = mode
    self.path = os.path.abspath(path(model_dir, LOCK))
    self.held = False

  def _holder_text(self, holder):
    return (f"pid {holder.get('pid')} on {holder.get('host')} (--mode={holder.get('mode')}, "
            f"started {holder.get('started')})")

  def acquire(self):
    if _HELD.get(self.path):
      _HELD[self.path] += 1
      self.held = True
      return self
    me = {"pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
      os.makedirs(self.model_dir, exist_ok=True)
    except OSError as e:
      raise ModelDirError(f"--model_dir={self.model_dir} is not writable ({e.strerror}); "
                          "choose another") from None
    for attempt in range(50):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = read_json(self.path)
        if not holder:
          # Being written by its creator (or left empty by a kill right after the create).
          if attempt < 10 or time.time() - _mtime(self.path) < 5:
            time.sleep(0.1)
            continue
          logging.warning("%s is empty or damaged (no holder can be read from it); taking it "
                          "over", self.path)
          _remove_if_same(self.path, holder)
          continue
        if holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
          logging.warning("--model_dir=%s: taking over the stale lock of %s, which is no longer "
                          "running", self.model_dir, self._holder_text(holder))
          _remove_if_same(self.path, holder)
          continue
        raise ModelDirLockedError(
            f"--model_dir={self.model_dir} is in use by {self._holder_text(holder)}; wait for it "
            f"to finish or stop it, or use another --model_dir (if that run is gone, delete "
            f"{self.path})") from None
      except OSError as e:
        raise ModelDirError(f"--model_dir={self.model_dir} is not writable ({e.strerror}); "
                            "choose another") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      _HELD[self.path] = 1
      self.held = True
      return self
    raise ModelDirLockedError(f"--model_dir={self.model_dir}: could not take {self.path}; "
                              "delete it if no run is using this model_dir")

  def release(self):
    if not self.held:
      return
    self.held = False
    _HELD[self.path] -= 1
    if _HELD[self.path]:
      return
    del _HELD[self.path]
    holder = read_json(self.path)
    if holder.get("pid") == os.getpid():
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _mtime(file_path):
  try:
    return os.path.getmtime(file_path)
  except OSError:
    return 0.0


def _remove_if_same(file_path, holder):
  """Removes a stale lock unless another process replaced it meanwhile (several runs may find the
  same stale lock; the rename makes exactly one of them remove it)."""
  aside = f"{file_path}.stale-{os.getpid()}"
  try:
    os.rename(file_path, aside)
  except FileNotFoundError:
    return
  if read_json(aside) != holder and not os.path.exists(file_path):
    os.rename(aside, file_path)  # a fresh lock: put it back
  else:
    os.remove(aside)


def lock(model_dir, mode, chief=None):
  """The RunLock of `model_dir` for the chief's pretraining, its one writer; a no-op context for
  every other mode, which only reads checkpoints and writes its own files, each atomically
  (write_results, probe.npz, the feature cache, exports renamed into a free version), so any
  number of them run beside the trainer and never block it; and on non-chief workers (they write
  into .workers/)."""
  chief = cluster.is_chief_process() if chief is None else chief
  if not chief or mode != "pretrain":
    return contextlib.nullcontext()
  return RunLock(model_dir, mode)
