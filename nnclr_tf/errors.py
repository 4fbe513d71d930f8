"""The errors a user can fix. Every message names the flag or file and the fix in one line.

The CLI catches `NNCLRError` and prints `error: <message>` with the exit code of its class
(`exit_code`); library users catch the same classes. ValueError/RuntimeError stay base classes so
that code written against the earlier per-module errors keeps working.
"""

from __future__ import annotations

EXIT_USAGE = 2     # a flag, file, data or model_dir problem; the message says what to change
EXIT_DIVERGED = 3  # NaN/Inf loss; the last good checkpoint is kept


class NNCLRError(Exception):
  """Base of every user-facing nnclr_tf error."""
  exit_code = EXIT_USAGE


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
