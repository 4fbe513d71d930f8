"""The model_dir contract: atomic files, results merging, finished-run detection."""

import json
import os

import pytest

from nnclr_tf import model_dir as md
from nnclr_tf.config import TrainConfig
from nnclr_tf.errors import ModelDirError


def test_merge_never_replaces_a_figure_with_none():
  old = {"steps": 10, "final_loss": 2.5, "knn_top1": 0.9}
  new = {"steps": 10, "final_loss": None, "knn_top1": 0.91, "export_dir": "e/2"}
  assert md.merge_results(old, new) == {"steps": 10, "final_loss": 2.5, "knn_top1": 0.91,
                                        "export_dir": "e/2"}
  # Another step: the old figures describe another model and are not carried over.
  assert md.merge_results(old, {"steps": 12, "final_loss": None}) == {"steps": 12,
                                                                      "final_loss": None}


def test_target_steps_before_the_data_is_loaded():
  recorded = {"global_batch": 128, "steps_per_epoch": 11}
  assert md.target_steps(TrainConfig(train_steps=7), recorded) == 7
  assert md.target_steps(TrainConfig(train_epochs=20, batch_size=128), recorded) == 220
  assert md.target_steps(TrainConfig(train_epochs=20, batch_size=64), recorded) is None


def test_results_and_flags_are_written_whole(tmp_path):
  d = str(tmp_path)
  md.write_results(d, "knn_eval", {"knn_top1": 0.5})
  md.write_flags(d, "--seed=1\n")
  assert md.read_results(d, "knn_eval") == {"knn_top1": 0.5}
  assert sorted(os.listdir(d)) == ["flags.txt", "knn_results.json"]  # no temp file left
  with pytest.raises(ZeroDivisionError):  # a writer that fails leaves the old file, no temp
    with md.atomic_path(os.path.join(d, "flags.txt")) as tmp, open(tmp, "w") as f:
      f.write("--seed=2\n")
      raise ZeroDivisionError
  assert open(os.path.join(d, "flags.txt")).read() == "--seed=1\n"
  assert sorted(os.listdir(d)) == ["flags.txt", "knn_results.json"]
  with open(os.path.join(d, "pretrain_results.json"), "w") as f:
    f.write("{not json")
  # Damaged: never read as "no results" silently (test_damaged_records has every file and mode).
  with pytest.raises(ModelDirError, match="pretrain_results.json is damaged"):
    md.read_results(d, "pretrain")
  assert md.read_results(d, "pretrain", damaged="warn") == {}
  assert json.dumps(md.export_metadata(d, 3))


def test_an_older_model_config_without_later_fields_is_the_same_architecture(tmp_path):
  """model_config.json written before symmetric_loss / zero_init_residual existed holds what
  those runs did (row-wise loss, zero-init residual): the same flags resume, others are refused."""
  from nnclr_tf.errors import ModelDirError
  d = str(tmp_path)
  now = {"backbone": "resnet18_cifar", "width": 8, "seed": 0, "symmetric_loss": False,
         "zero_init_residual": True}
  old = {k: v for k, v in now.items() if k not in ("symmetric_loss", "zero_init_residual")}
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, md.MODEL_CONFIG), "w") as f:
    json.dump(old, f)
  md.prepare(d, now)
  with pytest.raises(ModelDirError, match="different zero_init_residual"):
    md.prepare(d, {**now, "zero_init_residual": False})


@pytest.mark.parametrize("damage", ["truncated", "emptied", "garbled", "not an object"])
def test_a_damaged_model_config_is_one_error_line_and_never_rewritten(tmp_path, damage):
  from nnclr_tf.errors import ModelDirError
  d = str(tmp_path)
  good = json.dumps({"backbone": "small_cnn", "width": 8, "seed": 0})
  text = {"truncated": good[:len(good) // 2], "emptied": "", "garbled": "\x00\x13{]\xff",
          "not an object": "[1, 2]"}[damage]
  config = os.path.join(d, md.MODEL_CONFIG)
  with open(config, "w") as f:
    f.write(text)
  for call in (lambda: md.prepare(d, json.loads(good)), lambda: md.recorded_model_config(d),
               lambda: md.export_metadata(d, 3)):
    with pytest.raises(ModelDirError) as e:
      call()
    line = str(e.value)
    assert "\n" not in line and f"{md.MODEL_CONFIG} is damaged (" in line
    assert "restore it from a copy, or delete it" in line
  with open(config) as f:
    assert f.read() == text
  os.remove(config)
  assert md.recorded_model_config(d) == {}


def _dead_pid():
  """A pid that no process has: one of a child that has exited and been reaped."""
  import subprocess
  import sys
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_kill_mid_write_leaves_no_temp_past_the_next_write(tmp_path):
  """A SIGKILL between mkstemp and the rename leaves `.tmp-<host>-<pid>-...`; the next atomic
  write in that folder removes it. A live writer's temp (this process) and another host's temp
  (a worker on a shared disk, whose pid means nothing here) are left alone."""
  import socket
  host = socket.gethostname()
  d = tmp_path
  dead = d / f".tmp-{host}-{_dead_pid()}-abc-curves.csv"
  dead.write_text("torn")
  dead_dir = d / f".tmp-{host}-{_dead_pid()}-encoder-xyz"
  (dead_dir / "variables").mkdir(parents=True)
  live = d / f"{md.temp_prefix()}def-flags.txt"
  live.write_text("being written")
  other_host = d / f".tmp-not-{host}-1-ghi-flags.txt"
  other_host.write_text("another worker's")
  unrelated = d / ".tmp-notes"  # not ours: no host and pid
  unrelated.write_text("")
  md.write_text(str(d / "flags.txt"), "--seed=1\n")
  assert sorted(p.name for p in d.iterdir()) == sorted(
      ["flags.txt", live.name, other_host.name, unrelated.name])
  assert md.temp_prefix("encoder").endswith(f"-{os.getpid()}-encoder-")
