"""A finished run is not redone or rewritten: rerunning --mode=pretrain on a model_dir that reached
its last step with its kNN and export does nothing; missing parts run alone; a longer run
continues."""

import hashlib
import json
import os

import pytest
from test_run import TINY, results, run

from nnclr_tf import export

pytestmark = pytest.mark.slow

ARGS = ["--flagfile=flags/quickstart.cfg", *TINY, "--train_steps=4", "--noplots",
        "--knn_k=5"]


def digest(root):
  """sha256 of every file under root, by relative path."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_finished_run_is_left_alone_missing_parts_run_longer_run_continues(tmp_path):
  d = str(tmp_path / "m")
  p = run([*ARGS, f"--model_dir={d}"])
  assert p.returncode == 0, p.stderr[-3000:]
  first = results(d)
  assert first["steps"] == 4 and first["final_loss"] is not None
  enc1 = os.path.join(d, "export", "encoder", "1")
  assert export.read_metadata(enc1)["checkpoint_step"] == 4
  before = digest(d)

  # The same command again: one line, exit 0, not a byte changed, no new export version.
  p = run([*ARGS, f"--model_dir={d}"])
  assert p.returncode == 0, p.stderr[-3000:]
  said = [line for line in p.stdout.splitlines() if "nothing to do" in line]
  assert len(said) == 1 and "step 4" in said[0] and enc1 in said[0], p.stdout
  assert digest(d) == before

  # Evaluation and export missing (a crash after training): only they run; the training figures
  # of the first run stay (this run trained nothing, so it has no loss of its own).
  os.rename(enc1, str(tmp_path / "moved_export"))
  rec = results(d)
  del rec["knn_top1"]
  with open(os.path.join(d, "pretrain_results.json"), "w") as f:
    json.dump(rec, f)
  ckpts = {k: v for k, v in before.items() if k.startswith(("ckpt-", "checkpoint"))}
  p = run([*ARGS, f"--model_dir={d}"])
  assert p.returncode == 0, p.stderr[-3000:]
  again = results(d)
  assert again["knn_top1"] == pytest.approx(first["knn_top1"], abs=1e-6)
  for k in ("final_loss", "pairs_per_sec", "contrastive_acc", "nn_similarity"):
    assert again[k] == first[k], k
  assert export.read_metadata(again["export_dir"])["checkpoint_step"] == 4
  now = digest(d)
  assert {k: now[k] for k in ckpts} == ckpts  # no training step, no checkpoint rewritten

  # A longer run continues from the last step, warns that the schedule changes, exports anew.
  p = run([*ARGS, f"--model_dir={d}", "--train_steps=6"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "recomputed for 6 steps" in p.stderr
  longer = results(d)
  assert longer["steps"] == 6 and longer["resumed_from_step"] == 4
  assert export.read_metadata(longer["export_dir"])["checkpoint_step"] == 6
  assert longer["export_dir"] != again["export_dir"]
