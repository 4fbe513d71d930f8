"""Checkpoint naming; restore, verify and save are exercised by tests/test_reliability.py and
tests/test_operations.py (resume bit for bit, kills, non-finite states, disk full)."""

from nnclr_tf import checkpoints


def test_checkpoint_step():
  assert checkpoints.checkpoint_step("/a/b/ckpt-120") == 120
  assert checkpoints.checkpoint_step(None) == 0 and checkpoints.checkpoint_step("/a/ckpt-x") == 0


def test_checkpoint_at_and_require(tmp_path):
  import pytest

  from nnclr_tf.errors import ModelDirError
  with pytest.raises(ModelDirError, match="holds no checkpoint; run --mode=pretrain first"):
    checkpoints.require_checkpoint(str(tmp_path))
  assert checkpoints.checkpoint_at(str(tmp_path), 3) is None


# --- integrity: a damaged checkpoint is found before anything is restored ------------------------

import logging  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf.errors import ModelDirError  # noqa: E402


def _saved(folder, steps=(1, 2, 3), size=50_000):
  """CheckpointManager saves of one variable filled with the step, at each of `steps`."""
  v = tf.Variable(np.zeros([size], np.float32))
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(folder), max_to_keep=10)
  for s in steps:
    v.assign(tf.fill([size], float(s)))
    manager.save(checkpoint_number=s)
  return v


def _data_file(prefix):
  return prefix + ".data-00000-of-00001"


def _truncate(path, keep=0.5):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])


def _garble(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {"data truncated": lambda p: _truncate(_data_file(p)),
           "data emptied": lambda p: _truncate(_data_file(p), 0),
           "data garbled": lambda p: _garble(_data_file(p)),
           "data missing": lambda p: os.remove(_data_file(p)),
           "index truncated": lambda p: _truncate(p + ".index"),
           "index emptied": lambda p: _truncate(p + ".index", 0),
           "index garbled": lambda p: _garble(p + ".index")}


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_each_kind_of_damage_is_found_and_the_newest_intact_one_is_used(tmp_path, how, caplog):
  _saved(tmp_path)
  d = str(tmp_path)
  prefix = os.path.join(d, "ckpt-3")
  assert checkpoints.damage(prefix) is None
  DAMAGES[how](prefix)
  before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
  assert checkpoints.damage(prefix), how
  with caplog.at_level(logging.WARNING):
    chosen = checkpoints.newest_intact(d)
  assert chosen == os.path.join(d, "ckpt-2")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "ckpt-3 is damaged (" in warnings[0] and "ckpt-2, the newest" in \
      warnings[0], warnings
  # Left on disk as it was.
  assert {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)} == before
  assert checkpoints.require_checkpoint(d) == chosen
  # The restore takes it: the variable holds step 2's values.
  v = tf.Variable(np.zeros([50_000], np.float32))
  tf.train.Checkpoint(v=v).restore(checkpoints.newest_intact(d)).assert_consumed()
  assert float(v.numpy()[0]) == 2.0


def test_an_explicit_damaged_checkpoint_and_no_intact_one_are_one_error_line(tmp_path):
  _saved(tmp_path)
  d = str(tmp_path)
  _truncate(_data_file(os.path.join(d, "ckpt-2")))
  with pytest.raises(ModelDirError, match=r"--checkpoint=2: .*ckpt-2 is damaged \("):
    checkpoints.resolve_checkpoint(d, "2")
  assert checkpoints.resolve_checkpoint(d, "3").endswith("ckpt-3")
  for s in (1, 3):
    _truncate(_data_file(os.path.join(d, f"ckpt-{s}")))
  with pytest.raises(ModelDirError) as e:
    checkpoints.newest_intact(d)
  line = str(e.value)
  assert "\n" not in line and "holds no intact checkpoint" in line
  assert all(f"ckpt-{s}.* (" in line for s in (1, 2, 3)), line


def test_a_checkpoint_rewritten_after_its_check_is_checked_again(tmp_path):
  _saved(tmp_path, steps=(1,))
  prefix = os.path.join(str(tmp_path), "ckpt-1")
  assert checkpoints.damage(prefix) is None
  _truncate(_data_file(prefix))
  assert checkpoints.damage(prefix)  # the memo is keyed by the files' sizes and times


def test_the_state_file_names_what_a_restore_may_take(tmp_path):
  """As tf.train.latest_checkpoint: a complete ckpt-N the sound state file does not name (a save
  killed before the state file was rewritten) is passed over; with the state file missing,
  emptied, truncated mid-line or garbled, every ckpt-N on disk counts. Milestones always do."""
  _saved(tmp_path, steps=(1, 2))
  d = str(tmp_path)
  state = tmp_path / "checkpoint"
  text = state.read_text()
  assert checkpoints.state_file_paths(d) == [os.path.join(d, "ckpt-1"), os.path.join(d, "ckpt-2")]
  _saved(tmp_path / "elsewhere", steps=(3,))
  for name in os.listdir(tmp_path / "elsewhere"):
    if name.startswith("ckpt-3."):
      os.rename(tmp_path / "elsewhere" / name, tmp_path / name)
  assert checkpoints.candidates(d) == [os.path.join(d, f"ckpt-{s}") for s in (2, 1)]
  for damaged in ("", text[:text.index('"') + 3], "\x00\xff garbage {", None):
    if damaged is None:
      state.unlink()
    else:
      state.write_text(damaged)
    assert checkpoints.state_file_paths(d) is None, repr(damaged)
    assert checkpoints.candidates(d) == [os.path.join(d, f"ckpt-{s}") for s in (3, 2, 1)]
  state.write_text(text)
  os.makedirs(tmp_path / checkpoints.MILESTONES)
  for name in os.listdir(d):
    if name.startswith("ckpt-3."):
      os.rename(tmp_path / name, tmp_path / checkpoints.MILESTONES / name)
  assert checkpoints.candidates(d)[0] == os.path.join(d, checkpoints.MILESTONES, "ckpt-3")


def test_a_state_file_that_does_not_parse_is_kept_aside_and_written_anew(tmp_path, caplog):
  _saved(tmp_path, steps=(1, 2))
  d = str(tmp_path)
  (tmp_path / "checkpoint").write_bytes(b"model_checkpoint_path: \"ckpt-")
  with caplog.at_level(logging.WARNING):
    checkpoints.repair_state_file(d)
  assert (tmp_path / "checkpoint.damaged").read_bytes() == b"model_checkpoint_path: \"ckpt-"
  assert tf.train.latest_checkpoint(d) == os.path.join(d, "ckpt-2")
  assert checkpoints.state_file_paths(d) == [os.path.join(d, "ckpt-1"), os.path.join(d, "ckpt-2")]
  assert [r.getMessage() for r in caplog.records if "checkpoint.damaged" in r.getMessage()]
  before = (tmp_path / "checkpoint").read_bytes()
  checkpoints.repair_state_file(d)  # a sound one is left alone
  assert (tmp_path / "checkpoint").read_bytes() == before
