"""Everything README.md and CONTRIBUTING.md name exists: files, modules and their functions, flags
(and the enum values shown with them), test files and test functions, the files a model_dir holds.

A small parser reads each document's `code spans` and code blocks and sorts what they hold:
  - a repository path (nnclr_tf/..., tests/..., benchmarks/..., flags/..., notebooks/..., .ci/...,
    ../shared/..., a top-level or package file such as `run.py` or `augment.py`) must exist; a
    `tests/test_x.py::test_y` reference needs that test function too;
  - a file a run writes (`flags.txt`, `knn_results.json`, `curves.csv`, `retrieval_grid.png`) must
    be named by the library's source;
  - `module.attr` with an nnclr_tf module (`data.pretraining_stream`, `nnclr_tf.linear_probe.
    load_probe`, `cli.define_flags`), `.attr` after one, a bare `Name` or `function(` must resolve
    (README's `model.x` is a method of an NNCLR model);
  - `--flag` (and `--noflag`) must be a run.py flag or a benchmark script's, `--flag=a|b` values
    of an enum flag must be its choices.
Commands in code blocks are run or parsed by tests/test_readme.py; here only their paths count.
"""

import glob
import importlib
import os
import pkgutil
import re

import pytest

import nnclr_tf
from conftest import REPO, benchmark_parser
from nnclr_tf import cli

DOCS = ("README.md", "CONTRIBUTING.md")
MODULES = {m.name for m in pkgutil.iter_modules(nnclr_tf.__path__)}
REPO_ROOTS = ("nnclr_tf/", "tests/", "benchmarks/", "flags/", "notebooks/", ".ci/", "../shared/")
SOURCE_EXTENSIONS = ("py", "md", "toml", "cfg", "ipynb", "jsonl")
# Files a run writes into a model_dir (or an export): the library must name them.
OUTPUT_EXTENSIONS = ("json", "csv", "png", "npz", "txt", "lock")
# Named in the docs, not ours: other programs' words.
FOREIGN_COMMANDS = ("pip", "tfds", "saved_model_cli", "tensorflow_model_server", "docker", "curl",
                    "POST", "kill", "import")
FOREIGN_NAMES = {"TFSMLayer"}  # keras.layers.TFSMLayer, named beside the Keras probe
# absl's own flags: its parser handles them, cli.FLAGS does not list them.
ABSL_FLAGS = {"flagfile", "helpfull", "helpshort", "undefok"}


def shared_root():
  """The nearest shared/ above the repository (a worktree sits deeper than main)."""
  d = os.path.dirname(REPO)
  while os.path.dirname(d) != d:
    if os.path.isdir(os.path.join(d, "shared")):
      return os.path.join(d, "shared")
    d = os.path.dirname(d)
  return None


def split_document(text):
  """(code spans outside code blocks, in order; lines of fenced and indented code blocks)."""
  prose, code, lines, i = [], [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("```"):
      i += 1
      while i < len(lines) and not lines[i].startswith("```"):
        code.append(lines[i])
        i += 1
    elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()) and (
        not prose or not prose[-1].lstrip().startswith(("-", "|", "1."))):
      while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        code.append(lines[i])
        i += 1
      continue
    else:
      prose.append(line)
    i += 1
  paragraphs = "\n".join(prose).split("\n\n")
  spans = [(n, s) for n, p in enumerate(paragraphs) for s in re.findall(r"`([^`]+)`",
                                                                       p.replace("\n", " "))]
  return spans, code


def library_source():
  return "\n".join(open(p).read() for p in glob.glob(os.path.join(REPO, "nnclr_tf", "*.py")))


def benchmark_source(script=None):
  paths = [os.path.join(REPO, script)] if script else glob.glob(
      os.path.join(REPO, "benchmarks", "*.py"))
  return "\n".join(open(p).read() for p in paths if os.path.isfile(p))


def check_path(token):
  """None if the repository path exists, else the problem."""
  token, _, test_name = token.partition("::")
  if token.startswith("../shared/"):
    root = shared_root()
    if root is None:
      return None  # not beside this checkout: tests/test_readme.py skips its commands too
    path = os.path.join(root, token[len("../shared/"):])
  elif "/" in token:
    path = os.path.join(REPO, token)
  else:  # a bare file name: top level, in the package, a benchmark or a preset
    candidates = [os.path.join(REPO, d, token) for d in ("", "nnclr_tf", "benchmarks", "flags")]
    path = next((c for c in candidates if os.path.exists(c)), candidates[0])
  pattern = re.sub(r"<[^>]*>", "*", path)
  found = glob.glob(pattern)
  if not found:
    return f"{token}: no such file or folder"
  if test_name and not re.search(rf"^def {re.escape(test_name)}\(", open(found[0]).read(), re.M):
    return f"{token}::{test_name}: no such test function"
  return None


def resolve(dotted):
  """The object `dotted` names: nnclr_tf.<module>.<attr>... or <module>.<attr>...; README's
  `model.<method>` is a method of an NNCLR model."""
  parts = dotted.split(".")
  if parts[0] == "nnclr_tf":
    parts = parts[1:]
  obj = importlib.import_module(f"nnclr_tf.{parts[0]}")
  for i, part in enumerate(parts[1:]):
    if not hasattr(obj, part) and parts[0] == "model" and i == 0:
      obj = nnclr_tf.NNCLR
    obj = getattr(obj, part)
  return obj


def check_name(span, last_module):
  """(problem or None, module the span named). `span` is one code span of prose."""
  m = re.match(r"^(nnclr_tf\.)?([a-z_][a-z0-9_]*)((?:\.[A-Za-z_]\w*)+)\(?", span)
  if m and m.group(2) in MODULES:
    dotted = m.group(2) + m.group(3)
    try:
      resolve(dotted)
    except (AttributeError, ImportError):
      return f"{span}: {dotted} does not exist", m.group(2)
    return None, m.group(2)
  m = re.match(r"^\.([a-z_]\w*)$", span)
  if m and last_module:
    if not hasattr(importlib.import_module(f"nnclr_tf.{last_module}"), m.group(1)):
      return f"{span}: nnclr_tf.{last_module}.{m.group(1)} does not exist", last_module
    return None, last_module
  m = re.match(r"^([A-Z][A-Za-z0-9_]*)(\(|$)", span)
  if m and not m.group(1).startswith("TF_") and m.group(1) not in FOREIGN_NAMES:
    name = m.group(1)
    if not (hasattr(nnclr_tf, name) or any(
        hasattr(importlib.import_module(f"nnclr_tf.{mod}"), name) for mod in MODULES)):
      return f"{span}: no nnclr_tf module defines {name}", last_module
  m = re.match(r"^([a-z_][a-z0-9_]*)\(", span)
  if m and m.group(1) not in MODULES and not any(
      hasattr(importlib.import_module(f"nnclr_tf.{mod}"), m.group(1)) for mod in MODULES):
    return f"{span}: no nnclr_tf module defines {m.group(1)}", last_module
  return None, last_module


def check_flags(span):
  """Problems with the --flags of one prose code span."""
  words = span.split()
  if words[0] in FOREIGN_COMMANDS or words[0].startswith("http"):
    return []
  script = words[1] if words[0] == "python" and words[1:2] and words[1].startswith(
      "benchmarks/") else None
  problems = []
  for word in words:
    m = re.match(r"^--([a-z][a-z0-9_]*)(?:=(\S*))?", word)
    if not m:
      continue
    name, value = m.group(1), m.group(2)
    if script:  # its parser's options (run flags from config.FLAG_SPECS), else its source's
      parser = benchmark_parser(script) if os.path.isfile(os.path.join(REPO, script)) else None
      if parser is not None:
        if f"--{name}" not in parser.option_names():
          problems.append(f"{span}: {script} has no --{name}")
      elif not re.search(rf"""["']--{name}["']""", benchmark_source(script) + benchmark_source(
          "benchmarks/common.py")):
        problems.append(f"{span}: {script} has no --{name}")
      continue
    if name in ABSL_FLAGS:
      continue
    flag = cli.FLAGS[name] if name in cli.FLAGS else None
    if flag is None and name.startswith("no") and name[2:] in cli.FLAGS:
      flag = cli.FLAGS[name[2:]]
      if flag.flag_type() != "bool":
        problems.append(f"{span}: --{name[2:]} is not a boolean flag")
      continue
    if flag is None:
      if not re.search(rf"""["']--{name}["']""", benchmark_source()):
        problems.append(f"{span}: --{name} is neither a run.py flag nor a benchmark's")
      continue
    choices = getattr(flag.parser, "enum_values", None)
    if choices and value and re.fullmatch(r"[\w|]+", value) and value != "N":
      problems += [f"{span}: --{name}={v} is not one of {choices}" for v in value.split("|")
                   if v not in choices]
  return problems


def check_output_file(token, source):
  name = os.path.basename(token.rstrip("/"))
  if "*" in name or "<" in name:
    return None
  if not re.search(rf"""["'/]{re.escape(name)}["']""", source):
    return f"{token}: the library never names {name}"
  return None


PATH = re.compile(r"^(?:\.\./shared/|nnclr_tf/|tests/|benchmarks/|flags/|notebooks/|\.ci/)"
                  r"[\w./*<>:-]*$|^[\w-]+\.(?:" + "|".join(SOURCE_EXTENSIONS) + r")(?:::\w+)?$")
OUTPUT = re.compile(r"^[\w./<>-]*\.(?:" + "|".join(OUTPUT_EXTENSIONS) + r")$")


def problems(text):
  """Every dangling reference of one document, as 'reference: problem' lines."""
  spans, code = split_document(text)
  library = library_source()
  out, last_module, last_paragraph = [], None, None
  for paragraph, span in spans:
    if paragraph != last_paragraph:
      last_module, last_paragraph = None, paragraph
    out += check_flags(span)
    for token in re.split(r"[\s,()]+", span):
      token = token.rstrip(".:;")
      if "<" in span and not PATH.match(token):
        continue  # a placeholder (`model_dir/features/<checkpoint>-<data hash>.npz`)
      if PATH.match(token):
        problem = check_path(token)
        if problem and "/" not in token and f'"{token}"' in library:
          problem = None  # a bare name the library writes (continuous_eval.jsonl), not a source
        out.append(problem)
      elif OUTPUT.match(token) and not token.startswith("runs/"):
        out.append(check_output_file(token, library))
    if not PATH.match(span) and not OUTPUT.match(span):
      problem, last_module = check_name(span, last_module)
      out.append(problem)
  for line in code:
    for token in line.split():
      token = token.strip("\"'`").rstrip(".:;,")
      if PATH.match(token) and "/" in token:
        out.append(check_path(token))
  return [p for p in out if p]


@pytest.mark.parametrize("doc", DOCS)
def test_every_name_in_the_document_exists(doc):
  with open(os.path.join(REPO, doc)) as f:
    assert problems(f.read()) == []


def test_the_checker_finds_what_a_rename_breaks():
  text = "\n".join([
      "Read `nnclr_tf/renamed.py`, `tests/test_nothing.py`, `tests/test_docs.py::test_absent`.",
      "Call `data.no_such_stream(ds)` or `experiment.pretrain`, then `.no_such_mode`.",
      "Pass `--no_such_flag`, `--nosuch`, `--strategy=auto|gpu_farm`, `--noseed`.",
      "It writes `model_dir/never_written.json`; `NoSuchClass` and `no_such_function(x)`.",
      "", "    python benchmarks/renamed.py", ""])
  found = problems(text)
  for needle in ("nnclr_tf/renamed.py", "tests/test_nothing.py", "test_absent",
                 "data.no_such_stream", "nnclr_tf.experiment.no_such_mode", "--no_such_flag",
                 "--nosuch", "--strategy=gpu_farm", "--seed is not a boolean",
                 "never_written.json", "NoSuchClass", "no_such_function",
                 "benchmarks/renamed.py"):
    assert any(needle in p for p in found), (needle, found)
  assert len(found) == 13, found
  assert problems("Read `nnclr_tf/data.py`, `experiment.pretrain`, then `.knn_eval`; "
                  "`--noplots`, `--strategy=tpu|mirrored`, `flags.txt`, `Experiment`.") == []


def test_a_benchmark_flag_is_checked_against_the_script_parser():
  """throughput.py's run flags are generated from config.FLAG_SPECS (no "--batch_size" in its
  source): its parser, not a grep, says which exist."""
  assert problems("Run `python benchmarks/throughput.py --batch_size=8 --nouse_nn`.") == []
  found = problems("Run `python benchmarks/throughput.py --batch_size=8 --bogus_flag`.")
  assert len(found) == 1 and "throughput.py has no --bogus_flag" in found[0], found
