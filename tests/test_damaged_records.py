"""Every file of a model_dir, truncated, emptied or garbled, meets every mode that reads it: one
clear line and either an exit before any work (a record that runs depend on, never written over)
or a warning and a safe rebuild (caches, logs, what a mode writes anew). The README's table
"A damaged file in a model_dir" is this file's CELLS, row by row.

One finished model_dir is built once (pretrain, knn_eval, linear_eval, finetune, export,
continuous_eval, in this process); each cell copies it, damages one file and runs one mode through
the CLI (cli.parse_flags + run_main, as run.py does).
"""

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import pytest

from conftest import REPO
from nnclr_tf import cli as cli_lib
from nnclr_tf import export as export_lib
from nnclr_tf import flagfiles, monitors

QUICKSTART = os.path.join(REPO, "flags", "quickstart.cfg")
FLAGS = [f"--flagfile={QUICKSTART}", "--width=8", "--proj_hidden_dim=32", "--pred_hidden_dim=32",
         "--embedding_dim=16", "--batch_size=32", "--queue_size=256", "--train_steps=4",
         "--seed=3", "--knn_k=5", "--random_init_baseline=false", "--verbose=0", "--noplots",
         "--plot_tsne_points=100", "--linear_l2=1e-3", "--finetune_epochs=1",
         "--label_fraction=0.05", "--eval_timeout=1", "--eval_poll_seconds=1"
         ]
DAMAGES = ("truncated", "emptied", "garbled")
# The README table's names of the files that are not at the top of a model_dir.
PROBE, FEATURES = "linear_probe/probe.npz", "features/*.npz"
EXPORT_META = "export/encoder/<v>/assets.extra/nnclr_tf.json"


def damage(path, kind, seed=0):
  """Truncated: the first half of the bytes; emptied: no bytes; garbled: the middle third
  replaced by random bytes (the size kept)."""
  with open(path, "rb") as f:
    raw = f.read()
  assert raw, path
  if kind == "truncated":
    raw = raw[:len(raw) // 2]
  elif kind == "emptied":
    raw = b""
  else:
    a, b = len(raw) // 3, max(len(raw) // 3 + 1, 2 * len(raw) // 3)
    noise = random.Random(seed).randbytes(b - a)
    raw = raw[:a] + bytes(x ^ 0xA5 if x == y else x for x, y in zip(noise, raw[a:b])) + raw[b:]
  with open(path, "wb") as f:
    f.write(raw)
  return raw


def call(*args):
  """(exit code) of run.py's parse + run_main in this process."""
  cli_lib.FLAGS.unparse_flags()
  try:
    cli_lib.parse_flags(["run.py", *args])
    cli_lib.run_main(["run.py"])
  except SystemExit as e:
    return e.code or 0
  finally:
    cli_lib.FLAGS.unparse_flags()
  return 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("damaged") / "base")
  for mode in ("pretrain", "knn_eval", "linear_eval", "finetune", "export", "continuous_eval"):
    assert call(*FLAGS, f"--mode={mode}", f"--model_dir={d}") == 0, mode
  return d


def files_of(model_dir):
  """The files each cell damages, by the name the README's table uses."""
  feats = sorted(glob.glob(os.path.join(model_dir, "features", "ckpt-4-*.npz")))
  return {"model_config.json": "model_config.json", "flags.txt": "flags.txt",
          "pretrain_results.json": "pretrain_results.json",
          "knn_results.json": "knn_results.json",
          "linear_eval_results.json": "linear_eval_results.json",
          "finetune_results.json": "finetune_results.json",
          "export_results.json": "export_results.json", "curves.csv": "curves.csv",
          PROBE: os.path.join("linear_probe", "probe.npz"),
          FEATURES: os.path.relpath(feats[0], model_dir) if feats else None,
          EXPORT_META: os.path.join("export", "encoder", "1", export_lib.METADATA_FILE),
          "checkpoint": "checkpoint", "continuous_eval.jsonl": "continuous_eval.jsonl",
          "run.lock": "run.lock"}


# (file, mode) -> what happens; the README table lists the same cells. "error": exit 2, one
# `error:` line naming the file, the file unchanged, nothing written by the mode.
CELLS = {
    **{("model_config.json", m): "error" for m in ("pretrain", "knn_eval", "linear_eval",
                                                    "finetune", "plots", "export",
                                                    "continuous_eval")},
    ("flags.txt", "--flagfile"): "error",
    ("flags.txt", "pretrain"): "rewritten",
    ("pretrain_results.json", "pretrain"): "error",
    ("pretrain_results.json", "export"): "warning: export without pretraining figures",
    ("pretrain_results.json", "continuous_eval"): "warning: stops at --eval_timeout",
    ("knn_results.json", "knn_eval"): "rewritten",
    ("linear_eval_results.json", "linear_eval"): "rewritten",
    ("linear_eval_results.json", "export"): "warning: encoder only",
    ("finetune_results.json", "finetune"): "error",
    ("export_results.json", "export"): "rewritten",
    ("curves.csv", "pretrain"): "warning: damaged rows cut or set aside, appended after",
    ("curves.csv", "plots"): "warning: damaged rows left out",
    (PROBE, "linear_eval"): "rewritten",
    (PROBE, "export"): "warning: encoder only",
    (FEATURES, "linear_eval"): "warning: rebuilt",
    (FEATURES, "plots"): "warning: rebuilt",
    (EXPORT_META, "pretrain"): "warning: a new export version",
    ("checkpoint", "pretrain"): "warning: rebuilt from the files",
    ("checkpoint", "knn_eval"): "read from the files",
    ("checkpoint", "export"): "read from the files",
    ("continuous_eval.jsonl", "continuous_eval"): "warning: damaged lines scored again",
    ("run.lock", "pretrain"): "warning: taken over",
}


def mode_args(cell, d):
  """Pretraining goes on one step (it writes), except on a finished run's export, which it only
  checks; continuous_eval is told the run goes on (so it asks pretrain_results.json whether the
  run ended at step 4)."""
  name, mode = cell
  extra = {"plots": ["--plots"], "pretrain": ["--train_steps=5"],
           "continuous_eval": ["--train_steps=5"]}.get(mode, [])
  if name == EXPORT_META:
    extra = []
  return [*FLAGS, f"--mode={mode}", f"--model_dir={d}", *extra]


def snapshot(d):
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, d)] = os.stat(p).st_mtime_ns
  return out


def read(d, name):
  with open(os.path.join(d, name)) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("cell", sorted(CELLS), ids="|".join)
def test_a_damaged_file_gives_one_clear_line(finished, tmp_path, capsys, caplog, cell, kind):
  name, mode = cell
  d = str(tmp_path / "m")
  shutil.copytree(finished, d, symlinks=True)
  for record in glob.glob(os.path.join(d, "*.json*")):  # they name files by absolute path
    with open(record) as f:
      text = f.read()
    with open(record, "w") as f:
      f.write(text.replace(finished, d))
  rel = files_of(d)[name]
  if name == "run.lock":  # a kill right after the lock was created, long ago
    with open(os.path.join(d, rel), "w") as f:
      json.dump({"pid": 1 << 22, "host": "x", "mode": "pretrain", "started": "then"}, f)
  path = os.path.join(d, rel)
  damaged = damage(path, kind)
  if name == "run.lock":
    os.utime(path, (1e9, 1e9))
  before = snapshot(d)
  capsys.readouterr()
  caplog.clear()
  if mode == "--flagfile":
    code = call(f"--flagfile={path}", "--mode=knn_eval")
  else:
    code = call(*mode_args(cell, d))
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  expected = CELLS[cell]

  if expected == "error":
    assert code == 2 and len(errors) == 1, (code, err[-2000:])
    assert os.path.basename(rel) in errors[0] and "damaged" in errors[0] or \
        "empty" in errors[0], errors
    assert snapshot(d) == before  # nothing written, the damaged record untouched
    with open(path, "rb") as f:
      assert f.read() == damaged
    return

  assert code == 0, (code, err[-3000:])
  named = [w for w in warnings if os.path.basename(rel) in w]
  if expected.startswith("warning"):
    assert len(named) == 1, warnings
  if expected == "rewritten":
    if name == PROBE:
      from nnclr_tf.linear_probe import load_probe
      load_probe(path)
    elif name == "flags.txt":
      with open(path) as f:
        lines = f.read().splitlines()
      assert lines[0] == flagfiles.RUN_FLAGS_HEADER and lines[-1] == flagfiles.RUN_FLAGS_END
      assert "--train_steps=5" in lines
    else:
      assert read(d, rel)["checkpoint"].endswith("ckpt-4")
    return

  if name in ("pretrain_results.json", "linear_eval_results.json", PROBE) and \
      mode == "export":
    with open(path, "rb") as f:
      assert f.read() == damaged  # a record is not the export's to rewrite
    r = read(d, "export_results.json")
    assert r["encoder_export_dir"].endswith(os.path.join("encoder", "3"))
    meta = export_lib.read_metadata(r["encoder_export_dir"])
    assert meta["checkpoint_step"] == 4
    if name == "pretrain_results.json":
      assert meta["pretraining"] == {} and r["classifier_export_dir"].endswith("3")
    else:
      assert "classifier_export_dir" not in r and "not exported" in named[0]
  elif name == "pretrain_results.json":  # continuous_eval
    with open(path, "rb") as f:
      assert f.read() == damaged
  elif name == "curves.csv" and mode == "pretrain":
    _, rows, problem = monitors.parse_rows(path)
    assert rows[-1]["step"] == "5" and "torn" not in problem and "header" not in problem
    assert len(glob.glob(path + ".damaged-*")) == ("header" in named[0])
  elif name == "curves.csv":  # plots: drawn from the rows that parse
    with open(path, "rb") as f:
      assert f.read() == damaged
    assert os.path.exists(os.path.join(d, "plots", "training_curves.png"))
  elif name == FEATURES:
    cache = np.load(path)
    assert len(cache["train_features"]) == len(cache["train_labels"]) > 0
    assert "extracting the features again" in named[0]
  elif name == EXPORT_META:
    with open(path, "rb") as f:
      assert f.read() == damaged  # the damaged export is left as it is
    # The finished run's own export has lost its origin: the newest sound export of step 4
    # (the export mode's) serves instead; had there been none, a new version would be written.
    r = read(d, "pretrain_results.json")
    assert r["export_dir"].endswith(os.path.join("encoder", "2"))
    assert export_lib.read_metadata(r["export_dir"])["checkpoint_step"] == 4
  elif name == "checkpoint" and mode == "pretrain":
    assert os.path.exists(path + ".damaged") and read(d, "pretrain_results.json")["steps"] == 5
    assert "ckpt-5" in open(path).read()
  elif name == "checkpoint":  # readers read the files and leave the state file to the trainer
    with open(path, "rb") as f:
      assert f.read() == damaged
    assert read(d, f"{'knn' if mode == 'knn_eval' else 'export'}_results.json")[
        "checkpoint"].endswith("ckpt-4")
  elif name == "continuous_eval.jsonl":
    with open(path, "rb") as f:
      last = json.loads(f.read().splitlines()[-1])
    assert last["step"] == 4 and last["checkpoint"].endswith("ckpt-4")
  elif name == "run.lock":
    assert not os.path.exists(path)  # taken over, then released
    assert read(d, "pretrain_results.json")["steps"] == 5


def test_the_cells_are_the_readme_table(repo):
  """The README's table lists the (file, mode) pairs CELLS tests, no more, no fewer."""
  text = open(os.path.join(repo, "README.md")).read()
  section = text.split("### A damaged file in a model_dir", 1)[1].split("\n#", 1)[0]
  rows = [line.strip().strip("|").split("|") for line in section.splitlines()
          if line.startswith("| `")]
  listed = {(re.match(r"\s*`([^`]+)`", file).group(1), mode.strip())
            for file, modes, _ in rows for mode in modes.split(",")}
  assert listed == set(CELLS)
