"""The errors a user can fix. Every message names the flag or file and the fix in one line.

The CLI catches `NNCLRError` and prints `error: <message>` with the exit code of its class
(`exit_code`); library users catch the same classes. ValueError/RuntimeError stay base classes so
that code written against the earlier per-module errors keeps working.
"""

from __future__ import annotations

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


class Preempted(TrainingError):
  """SIGTERM/SIGINT stopped training after a checkpoint was saved; the exit code is the shell's
  128 + signal number (143 SIGTERM, 130 SIGINT), so a job scheduler sees a signal-like status."""
  prefix = "stopped"

  def __init__(self, message, signum):
    super().__init__(message)
    import signal
    self.signum = int(signum)
    self.exit_code = EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM
