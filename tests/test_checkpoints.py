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
