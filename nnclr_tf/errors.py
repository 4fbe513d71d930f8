"""The errors a user can fix. Every message names the flag or file and the fix in one line.

The CLI catches `NNCLRError` and prints `error: <message>` with the exit code of its class
(`exit_code`); library users catch the same classes. ValueError/RuntimeError stay base classes so
that code written against the earlier per-module errors keeps working.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys

EXIT_USAGE = 2     # a flag, file, data or model_dir problem; the message says what to change
EXIT_DIVERGED = 3  # NaN/Inf loss; the last good checkpoint is kept
EXIT_SIGINT = 130  # stopped by SIGINT (Ctrl-C) after saving a checkpoint; rerun to resume
EXIT_SIGTERM = 143  # stopped by SIGTERM (preemption) after saving a checkpoint; rerun to resume


class NNCLRError(Exception):
  """Base of every user-facing nnclr_tf error."""
  exit_code = EXIT_USAGE
  prefix = "error"  # the CLI prints `<prefix>: <message>`


class ConfigError(NNCLRError, ValueError):
  """A flag or config value that cannot work (names the flag and a value that would)."""


class ModelDirError(ConfigError):
  """A --model_dir that cannot be used (unwritable, another architecture, no checkpoint)."""


class DataError(NNCLRError, ValueError):
  """Training or evaluation data that cannot be read (names the file, folder or dataset)."""


class ExportError(NNCLRError, ValueError):
  """A refused export (existing version, bad probe file, unwritable base)."""


class TrainingError(NNCLRError, RuntimeError):
  """Training that cannot go on (workers out of step, ...)."""


class NonFiniteLossError(TrainingError):
  """A NaN/Inf loss or state; the message names the step and the checkpoint that was kept."""
  exit_code = EXIT_DIVERGED


class ModelDirLockedError(ModelDirError):
  """Another live run holds the model_dir's lock (the message names its pid, host and start)."""


class DiskFullError(ModelDirError):
  """A write into the model_dir failed for lack of space (ENOSPC, EDQUOT, EFBIG); the message
  names the file and the checkpoint that was kept."""


class StrategyError(NNCLRError, RuntimeError):
  """A --strategy that cannot start here (no TPU, a missing or malformed TF_CONFIG)."""


class Preempted(TrainingError):
  """SIGTERM/SIGINT stopped training after a checkpoint was saved; the exit code is the shell's
  128 + signal number (143 SIGTERM, 130 SIGINT), so a job scheduler sees a signal-like status."""
  prefix = "stopped"

  def __init__(self, message, signum):
    super().__init__(message)
    self.signum = int(signum)
    self.exit_code = EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM


# --- a full disk -------------------------------------------------------------------------------
# Here, beside the error it becomes, and free of TensorFlow: the CLI recognises a full disk in
# whatever raised it, before or after TensorFlow was imported.

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXT = ("No space left", "Disk quota", "File too large")


def is_disk_full(error) -> bool:
  """True for an OSError or a TensorFlow error caused by a full disk, a quota or a file-size
  limit (TensorFlow's file system layer reports errno only as text)."""
  if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
    return True
  tf = sys.modules.get("tensorflow")  # a TensorFlow error can only come from a loaded TensorFlow
  return (tf is not None and isinstance(error, tf.errors.OpError)
          and any(t in str(error) for t in DISK_FULL_TEXT))


def _latest_checkpoint_name(model_dir):
  """The checkpoint the `checkpoint` state file names, read as text (None without one)."""
  try:
    with open(os.path.join(model_dir, "checkpoint")) as f:
      m = re.search(r'^model_checkpoint_path: "([^"]+)"', f.read(), re.M)
  except OSError:
    return None
  return os.path.basename(m.group(1)) if m else None


def disk_full_message(error, model_dir) -> str:
  """One line for a write that failed on a full disk (or a quota, or a file-size limit)."""
  text = str(error)
  # TensorFlow's messages carry the file among graph details: keep the path under model_dir.
  paths = re.findall(re.escape(os.path.abspath(model_dir)) + r"[^\s:;,'\"]*", text)
  what = getattr(error, "filename", None) or (paths[0] if paths else "a file")
  reason = getattr(error, "strerror", None) or next(
      (t for t in DISK_FULL_TEXT if t in text), "no space left")
  latest = _latest_checkpoint_name(model_dir)
  kept = (f"the last good checkpoint {latest} is kept and a rerun resumes from it" if latest
          else "no checkpoint was written")
  return (f"--model_dir={model_dir}: writing {what} failed ({reason}); free space on its disk "
          f"or use another --model_dir; {kept}")
