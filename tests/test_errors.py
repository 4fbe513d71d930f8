"""The error classes' exit codes, and a full disk recognised in whatever raised it."""

import errno
import signal

import tensorflow as tf

from nnclr_tf import errors


def test_exit_codes_by_class():
  assert errors.ConfigError("x").exit_code == errors.EXIT_USAGE == 2
  assert errors.NonFiniteLossError("x").exit_code == errors.EXIT_DIVERGED == 3
  assert errors.Preempted("x", signal.SIGTERM).exit_code == 143
  assert errors.Preempted("x", signal.SIGINT).exit_code == 130
  assert isinstance(errors.StrategyError("x"), RuntimeError)  # code catching RuntimeError works


def test_a_full_disk_is_recognised_from_oserror_and_tensorflow_text():
  assert errors.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  assert errors.is_disk_full(OSError(errno.EFBIG, "File too large"))
  assert not errors.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  assert errors.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "x: No space left"))
  assert not errors.is_disk_full(tf.errors.NotFoundError(None, None, "no such file"))


def test_the_disk_full_line_names_the_file_and_the_checkpoint_kept(tmp_path):
  d = str(tmp_path)
  e = OSError(errno.ENOSPC, "No space left on device", f"{d}/ckpt-9.index")
  assert errors.disk_full_message(e, d) == (
      f"--model_dir={d}: writing {d}/ckpt-9.index failed (No space left on device); free space "
      "on its disk or use another --model_dir; no checkpoint was written")
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-8"\n')
  assert errors.disk_full_message(e, d).endswith(
      "the last good checkpoint ckpt-8 is kept and a rerun resumes from it")
