"""Every command README.md shows is accounted for here, and run as written where this machine can.

README_COMMANDS maps each command, as README shows it (whitespace collapsed, backslash
continuations joined), to what the test does with it. A README command missing from the table,
or a table entry README no longer shows, fails test_table_matches_the_readme, so the table
cannot go stale. Commands this machine cannot run sit in README blocks whose first line is
"# Needs <what>; not run by the tests."; their run.py flags are still parsed, so a typo fails.

Runnable commands run in a scratch directory (run.py, nnclr_tf and flags/ symlinked in), so
nothing is written into the repository. Tiny step counts are appended after the command as
written, where the command line beats the preset's flags. The quickstart pretrain runs once per
module; the evaluation, export and serving commands then run on its model_dir.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, benchmark_parser, listing_changes, repo_listing
from nnclr_tf import cli, config, results
from nnclr_tf import model_dir as md

README = os.path.join(REPO, "README.md")
COMMAND_WORDS = ("python", "pip", "curl", "docker", "cat", "export", "saved_model_cli",
                 "tensorflow_model_server", "nnclr-tf")
MARKER = re.compile(r"^# Needs .+; not run by the tests\.$")
QS = "runs/quickstart"
QS_TINY = ["--train_steps=10"]


@dataclasses.dataclass(frozen=True)
class Run:
  """Run as written (plus `extra` flags appended) in the scratch directory; check the files."""
  outputs: tuple = ()
  extra: tuple = ()
  stdout: str = ""


# The CIFAR folder example decodes all 50,000 JPEGs once (the in-memory cache) and scores kNN of
# a tiny encoder on them: it runs wherever ../shared/data is (CI has it beside the clone).
NO_SHARED = "../shared/data/cifar10/train (the 50,000 CIFAR-10 JPEGs) is not beside this checkout"

PARSE = "parse"          # needs what this machine lacks; run.py flags parsed only
NOT_RUN = "not run"      # needs what this machine lacks; not a run.py command
BENCHMARK = "benchmark"  # minutes each: the script and its flags must exist
PIP = "pip"              # pip install --dry-run in a scratch copy (metadata and resolution)
CI = "ci"                # the test command itself: .ci/run must run exactly it
INSTALLED = "installed"  # the installed `nnclr-tf`: tests/test_cli.py runs it from a wheel

README_COMMANDS = {
    # Set-up
    "pip install -e . && python run.py --mode=pretrain --flagfile=flags/quickstart.cfg":
        Run(outputs=(f"{QS}/pretrain_results.json", f"{QS}/flags.txt", f"{QS}/checkpoint",
                     f"{QS}/export/encoder/1/saved_model.pb"), extra=QS_TINY),
    'pip install -e ".[test]" && python -m pytest -q tests': CI,
    # Presets
    "python run.py --flagfile=flags/cifar10_resnet18.cfg --dataset=folder "
    "--image_dir=../shared/data/cifar10/train --val_images=5000":
        Run(outputs=("runs/cifar10_resnet18/pretrain_results.json",),
            extra=("--train_steps=1", "--batch_size=16", "--queue_size=64", "--width=8",
                   "--proj_hidden_dim=32", "--pred_hidden_dim=32", "--embedding_dim=16",
                   "--noplots", "--norandom_init_baseline", "--verbose=0")),
    # Scaling out
    "python run.py --flagfile=flags/imagenet_resnet50.cfg --strategy=mirrored "
    "--data_dir=/data/tfds": PARSE,
    """export TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": """
    """{"type": "worker", "index": 0}}'""": NOT_RUN,
    "python run.py --flagfile=flags/imagenet_resnet50.cfg --strategy=multi_worker "
    "--model_dir=gs://bucket/nnclr --data_dir=gs://bucket/tfds": PARSE,
    "python benchmarks/scaling.py": BENCHMARK,
    # Modes: the quickstart's 10 steps keep ckpt-10 (the full run's 220 keep 198, 209, 220)
    "python run.py --mode=knn_eval --flagfile=flags/quickstart.cfg --checkpoint=198":
        Run(outputs=(f"{QS}/knn_results.json",), extra=("--checkpoint=10",),
            stdout="ckpt-10"),
    # Evaluation, on the quickstart's model_dir
    "python run.py --mode=knn_eval --flagfile=flags/quickstart.cfg # knn_results.json":
        Run(outputs=(f"{QS}/knn_results.json",)),
    "python run.py --mode=linear_eval --flagfile=flags/quickstart.cfg # linear_eval_results.json":
        Run(outputs=(f"{QS}/linear_eval_results.json", f"{QS}/linear_probe/probe.npz"),
            extra=("--linear_l2=1e-3",)),
    "python run.py --mode=finetune --flagfile=flags/quickstart.cfg --label_fraction=0.1":
        Run(outputs=(f"{QS}/finetune_results.json",), extra=("--finetune_epochs=1",)),
    "python run.py --mode=plots --flagfile=flags/quickstart.cfg # plots/*.png":
        Run(outputs=(f"{QS}/plots/*.png",), extra=("--plot_tsne_points=300",)),
    "python benchmarks/knn_memory.py": BENCHMARK,
    # Serving
    "python run.py --mode=export --flagfile=flags/quickstart.cfg":
        Run(outputs=(f"{QS}/export_results.json",)),
    'pip install -e ".[serving]"': PIP,
    "pip install .": PIP,
    'pip install -e ".[arrayrecord]"': PIP,
    "nnclr-tf --mode=pretrain --flagfile=flags/quickstart.cfg --model_dir=runs/qs": INSTALLED,
    "saved_model_cli show --dir runs/quickstart/export/encoder/1 --all":
        Run(stdout="signature_def['serving_default']"),
    "cat > runs/quickstart/export/models.config <<'CFG'": NOT_RUN,
    """docker run --rm -p 8500:8500 -p 8501:8501 -v "$PWD/runs/quickstart/export:/models" """
    "tensorflow/serving --model_config_file=/models/models.config": NOT_RUN,
    "tensorflow_model_server --rest_api_port=8501 --model_name=encoder "
    "--model_base_path=$PWD/runs/quickstart/export/encoder": NOT_RUN,
    """python -c "import base64,json,sys; print(json.dumps({'signature_name': """
    """'serve_image_bytes', 'instances': [{'image_bytes': {'b64': """
    """base64.b64encode(open(sys.argv[1],'rb').read()).decode()}}]}))" cat.jpg > body.json""":
        Run(outputs=("body.json",)),
    "curl -d @body.json http://localhost:8501/v1/models/encoder:predict": NOT_RUN,
    # Performance
    "python benchmarks/throughput.py --batch_size=256 --queue_size=65536 "
    "# the train step alone": BENCHMARK,
    "python benchmarks/nn_overhead.py --batch_size=256 # use_nn true vs false": BENCHMARK,
    "python benchmarks/input_pipeline.py --image_dir=../shared/data/cifar10/train": BENCHMARK,
    "python benchmarks/peak.py # matmul GFLOP/s ceiling": BENCHMARK,
    "python benchmarks/peer_compare.py --rounds=2 --steps=10 # vs lightly (peer env)": BENCHMARK,
    "python benchmarks/parity.py --side=both --seed=0 --steps=300": BENCHMARK,
    "python benchmarks/curves.py": BENCHMARK,
    # Operating a run (after linear_eval has exported the classifier)
    'python -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=2))" '
    "runs/quickstart/export/classifier/1/assets.extra/nnclr_tf.json":
        Run(stdout='"encoder_checkpoint"'),
}

# Python snippets (```python blocks), keyed by their first line; run as written after the
# quickstart, in the scratch directory.
README_SNIPPETS = {
    "import keras, nnclr_tf": Run(stdout="(256, 128)"),  # small_cnn width 32: 4 x 32 features
    "import numpy as np, tensorflow as tf": Run(stdout="linear probe top-1:"),
    "from nnclr_tf import Experiment, experiment": Run(stdout="kNN top-1"),
    "import keras": Run(stdout="probe accuracy:"),
}


# ------------------------------------------------------------------------------------------------
# README parsing

def collapse(text):
  """The table key of a command: a heredoc by its first line, else whitespace collapsed."""
  if re.search(r"<<'?(\w+)'?", text.splitlines()[0]):
    text = text.splitlines()[0]
  return " ".join(text.replace("\\\n", " ").split())


def shell_commands(block):
  """(command text, marker) for each command of a shell block; a heredoc or a quoted string may
  span lines, as may backslash continuations."""
  marker, commands, current, heredoc = None, [], "", None
  for line in block:
    if heredoc:
      current += "\n" + line
      if line.strip() == heredoc:
        commands.append(current)
        current, heredoc = "", None
      continue
    if not current and (not line.strip() or line.lstrip().startswith("#")):
      if MARKER.match(line.strip()):
        marker = line.strip()
      continue
    current = f"{current}\n{line}" if current else line
    m = re.search(r"<<'?(\w+)'?", line)
    if m:
      heredoc = m.group(1)
      continue
    if current.endswith("\\"):
      continue
    try:
      shlex.split(current, comments=True)
    except ValueError:  # a quoted string goes on
      continue
    commands.append(current)
    current = ""
  assert not current and not heredoc, f"unterminated command in README: {current!r}"
  return [(c, marker) for c in commands]


def readme_items():
  """(kind, key, full text, marker): kind 'block' or 'inline' for shell commands, 'python' for
  snippets (key: the first line)."""
  lines = open(README).read().splitlines()
  items, prose, i = [], [], 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("```"):
      lang, block = line[3:].strip(), []
      i += 1
      while not lines[i].startswith("```"):
        block.append(lines[i])
        i += 1
      i += 1
      if lang == "python":
        items.append(("python", block[0], "\n".join(block), None))
      elif lang in ("", "sh", "bash", "shell", "console"):
        items += [("block", collapse(c), c, m) for c, m in shell_commands(block)]
      continue
    if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
      block = []
      while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        block.append(lines[i][4:])
        i += 1
      items += [("block", collapse(c), c, m) for c, m in shell_commands(block)]
      continue
    prose.append(line)
    i += 1
  for span in re.findall(r"`([^`]+)`", " ".join(prose)):
    if span.split()[0] in COMMAND_WORDS and len(span.split()) > 1:  # not a lone name
      items.append(("inline", collapse(span), span, None))
  return items


ITEMS = readme_items()
SHELL = {key: (text, marker) for kind, key, text, marker in ITEMS if kind != "python"}
SNIPPETS = {key: text for kind, key, text, _ in ITEMS if kind == "python"}


def test_table_matches_the_readme():
  assert len(SHELL) == len([it for it in ITEMS if it[0] != "python"]), "a command shown twice"
  assert sorted(set(SHELL) - set(README_COMMANDS)) == [], "README commands missing from the table"
  assert sorted(set(README_COMMANDS) - set(SHELL)) == [], "table entries README no longer shows"
  assert sorted(SNIPPETS) == sorted(README_SNIPPETS)


def test_commands_not_run_are_marked_in_the_readme():
  for key, (_, marker) in SHELL.items():
    kind = README_COMMANDS[key]
    if kind in (PARSE, NOT_RUN):
      assert marker, f"README must mark the block of {key!r} with '# Needs ...; not run ...'"
    if isinstance(kind, Run):
      assert not marker, f"{key!r} is run by the tests but README says it is not"


@pytest.mark.parametrize("key", [k for k in README_COMMANDS if "python run.py" in k])
def test_flags_of_run_commands_parse(key, monkeypatch):
  """run.py's parser on every run.py command as written, run or not: a mistyped flag or preset
  path fails here in seconds."""
  argv = shlex.split(SHELL[key][0].split(" && ")[-1].replace("\\\n", " "), comments=True)
  assert argv[:2] == ["python", "run.py"]
  monkeypatch.chdir(REPO)
  try:
    cli.parse_flags(["run.py", *argv[2:]])
  finally:
    cli.FLAGS.unparse_flags()


def test_tf_config_example_is_valid_json():
  key = next(k for k in README_COMMANDS if k.startswith("export TF_CONFIG="))
  (assignment,) = shlex.split(SHELL[key][0])[1:]
  config = json.loads(assignment.split("=", 1)[1])
  assert config["task"] == {"type": "worker", "index": 0}
  assert len(config["cluster"]["worker"]) == 2


@pytest.mark.parametrize("key", [k for k, v in README_COMMANDS.items() if v == BENCHMARK])
def test_benchmark_commands_name_real_scripts_and_flags(key):
  """The scripts take minutes (tests/test_benchmarks.py runs each with tiny sizes); here the
  script must exist and accept the command. A script with a parser() parses it as it would run
  it: each run flag is one of config.FLAG_SPECS (generated, so typed and checked by the schema)
  and the Experiment it makes with its preset is valid; another script must name each flag."""
  argv = shlex.split(SHELL[key][0], comments=True)
  script = os.path.join(REPO, argv[1])
  assert argv[0] == "python" and os.path.isfile(script), key
  source = open(script).read() + open(os.path.join(REPO, "benchmarks", "common.py")).read()
  ap = benchmark_parser(argv[1])
  for arg in argv[2:]:
    name = arg.split("=", 1)[0]
    if ap is not None and not re.search(rf"""["']{re.escape(name)}["']""", source):
      flag = name[2:]
      schema = set(config.FLAG_SPECS) | set(config.ALIASES)
      assert flag in schema or (flag.startswith("no") and flag[2:] in schema), (key, name)
      assert name in ap.option_names(), (key, name)
    else:
      assert re.search(rf"""["']{re.escape(name)}["']""", source), (key, name)
  if ap is not None:
    ap.parse(argv[2:])  # a usage error exits (SystemExit) with argparse's message


CI_PREAMBLE = ("set -euo pipefail", 'cd "$(dirname "$0")/.."')


def ci_commands(text):
  """The commands of .ci/run: comment lines and the preamble aside, the `|| exit` that makes a
  failed `&&` list fatal under set -e stripped."""
  out = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#") or line in CI_PREAMBLE:
      continue
    out.append(line.removesuffix(" || exit"))
  return out


def test_ci_runs_the_readmes_two_setup_commands_in_order():
  """.ci/run is a newcomer's path: the quickstart as written, then the test command as written,
  nothing else."""
  with open(os.path.join(REPO, ".ci", "run")) as f:
    commands = ci_commands(f.read())
  test_command = next(k for k, v in README_COMMANDS.items() if v == CI)
  assert commands == [SHELL[QUICKSTART][0], SHELL[test_command][0]]
  order = [key for kind, key, _, _ in ITEMS if key in (QUICKSTART, test_command)]
  assert order == [QUICKSTART, test_command], "README must show the quickstart first"


def test_ci_commands_parser_sees_a_changed_line():
  assert ci_commands("set -euo pipefail\n# c\npip install . || exit\n") == ["pip install ."]
  assert ci_commands('cd "$(dirname "$0")/.."\npython -m pytest tests\n') == [
      "python -m pytest tests"]


def pip_dry_run(command, tmp_path):
  """`pip install ...` as written, with --dry-run, on a copy of pyproject.toml and the package:
  checks requires-python against this Python and that the requirements resolve, installs
  nothing."""
  argv = shlex.split(command)
  assert argv[:2] == ["pip", "install"]
  scratch = tmp_path / "pip"
  scratch.mkdir()
  for name in ("pyproject.toml", "README.md", "nnclr_tf"):
    os.symlink(os.path.join(REPO, name), scratch / name)
  p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation",
                      *argv[2:]], cwd=scratch, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert re.search(r"Would install .*nnclr[-_]tf-\d", p.stdout), p.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k, v in README_COMMANDS.items() if v == PIP] +
                         [k for k in README_COMMANDS if k.startswith("pip install -e . &&")])
def test_pip_commands_resolve(key, tmp_path):
  pip_dry_run(key.split(" && ")[0], tmp_path)


# ------------------------------------------------------------------------------------------------
# Running the commands

def shared_cifar():
  """The nearest ../shared/data/cifar10/train above the repository (a worktree sits deeper)."""
  d = os.path.dirname(REPO)
  while True:
    if os.path.isdir(os.path.join(d, "shared", "data", "cifar10", "train")):
      return os.path.join(d, "shared")
    if os.path.dirname(d) == d:
      return None
    d = os.path.dirname(d)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  """<tmp>/repo with run.py, nnclr_tf, flags and benchmarks symlinked; <tmp>/shared points at the
  shared data, so README's ../shared paths resolve as they do from the main checkout."""
  root = tmp_path_factory.mktemp("readme")
  repo = root / "repo"
  repo.mkdir()
  for name in ("run.py", "nnclr_tf", "flags", "benchmarks"):
    os.symlink(os.path.join(REPO, name), repo / name)
  if shared_cifar():
    os.symlink(shared_cifar(), root / "shared")
  return repo


def shell(text, cwd, timeout=900):
  env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def run_as_written(key, cwd):
  """Runs README's command (its run part after `&&`) with the table's extra flags appended."""
  spec = README_COMMANDS[key]
  text = SHELL[key][0].split(" && ")[-1]
  if spec.extra:
    text = shlex.join([*shlex.split(text, comments=True), *spec.extra])
  p = shell(text, cwd)
  assert p.returncode == 0, f"{text}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
  check_outputs(spec, cwd, p.stdout)


def check_outputs(spec, cwd, stdout):
  import glob
  for pattern in spec.outputs:
    assert glob.glob(os.path.join(cwd, pattern)), f"{pattern} was not written"
    mode = next((m for m, name in md.RESULTS.items() if pattern.endswith("/" + name)), None)
    if mode:  # every key the run wrote is one nnclr_tf/results.py declares
      with open(os.path.join(cwd, pattern)) as f:
        keys = set(json.load(f))
      assert keys <= results.declared_keys(mode), keys - results.declared_keys(mode)
  assert spec.stdout in stdout, stdout[-2000:]


QUICKSTART = next(k for k in README_COMMANDS if k.startswith("pip install -e . &&"))


# What the quickstart run changed in the repository checkout (filled by the fixture).
QUICKSTART_REPO_CHANGES = []


@pytest.fixture(scope="module")
def quickstart(scratch):
  before = repo_listing()
  run_as_written(QUICKSTART, scratch)
  QUICKSTART_REPO_CHANGES[:] = listing_changes(before, repo_listing())
  with open(scratch / QS / "pretrain_results.json") as f:
    assert json.load(f)["steps"] == 10
  return scratch


def tree_digest(root):
  """sha256 of every file under root by relative path (lock files aside)."""
  import hashlib
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      if name.endswith(".lock"):
        continue
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_repo_listing_compares_before_and_after_not_absence(tmp_path):
  """The checkout rule: what existed before (a user's runs/) is no change; a file added, changed
  or removed is."""
  (tmp_path / "runs" / "quickstart").mkdir(parents=True)
  (tmp_path / "runs" / "quickstart" / "pretrain_results.json").write_text("{}")
  (tmp_path / "README.md").write_text("x")
  (tmp_path / "__pycache__").mkdir()
  before = repo_listing(tmp_path)
  assert listing_changes(before, repo_listing(tmp_path)) == []
  (tmp_path / "__pycache__" / "m.pyc").write_text("tool cache")  # not the tests' writing
  assert listing_changes(before, repo_listing(tmp_path)) == []
  (tmp_path / "runs" / "quickstart" / "knn_results.json").write_text("{}")
  (tmp_path / "README.md").write_text("xy")
  os.remove(tmp_path / "runs" / "quickstart" / "pretrain_results.json")
  assert listing_changes(before, repo_listing(tmp_path)) == [
      "added runs/quickstart/knn_results.json", "changed README.md",
      "removed runs/quickstart/pretrain_results.json"]


@pytest.mark.slow
def test_quickstart_as_written(quickstart):
  # The fixture proved the appended flag beat the preset (20 epochs). The run in the scratch
  # directory wrote nothing into the checkout, whatever the checkout already held (a user's own
  # runs/quickstart from the README's first command included).
  assert QUICKSTART_REPO_CHANGES == []
  # The same command again: a finished run is not redone or rewritten, no new export version.
  before = tree_digest(quickstart / QS)
  text = shlex.join([*shlex.split(SHELL[QUICKSTART][0].split(" && ")[-1]), *QS_TINY])
  p = shell(text, quickstart)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "nothing to do" in p.stdout and "finished at step 10" in p.stdout, p.stdout[-2000:]
  assert tree_digest(quickstart / QS) == before
  assert os.listdir(quickstart / QS / "export" / "encoder") == ["1"]


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k, v in README_COMMANDS.items()
                                 if isinstance(v, Run) and k != QUICKSTART])
def test_command_as_written(key, quickstart):
  if "../shared/" in key:
    if not shared_cifar():
      pytest.skip(reason=NO_SHARED)
  if "cat.jpg" in key:
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(quickstart / "cat.jpg")
  run_as_written(key, quickstart)
  if "cat.jpg" in key:
    body = json.loads((quickstart / "body.json").read_text())
    assert body["signature_name"] == "serve_image_bytes"
    import base64
    jpeg = base64.b64decode(body["instances"][0]["image_bytes"]["b64"])
    assert jpeg == (quickstart / "cat.jpg").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("first_line", sorted(README_SNIPPETS))
def test_python_snippet_as_written(first_line, quickstart):
  path = quickstart / "snippet.py"
  path.write_text(SNIPPETS[first_line])
  p = shell(f"python {path}", quickstart)
  assert p.returncode == 0, p.stderr[-3000:]
  check_outputs(README_SNIPPETS[first_line], quickstart, p.stdout)


def test_installed_command_is_the_one_the_wheel_test_runs():
  """tests/test_cli.py runs the README's `nnclr-tf` command from an installed wheel outside the
  repository (with tiny-run flags appended)."""
  with open(os.path.join(REPO, "tests", "test_cli.py")) as f:
    wheel_test = f.read()
  for key, kind in README_COMMANDS.items():
    if kind == INSTALLED:
      argv = shlex.split(key)
      assert argv[0] == "nnclr-tf"
      assert all(f'"{a}"' in wheel_test for a in argv[1:]), key
