"""Test session set-up: the CPU is split into 4 logical devices before TensorFlow initialises, so
MirroredStrategy tests can run 1, 2 and 4 replicas in this one process."""

import functools
import importlib
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf import distributed  # noqa: E402

LOGICAL_CPUS = 4
distributed.split_cpu(LOGICAL_CPUS)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def mirrored(n):
  """MirroredStrategy over the first n logical CPUs. TF assigns collective group keys per process,
  so a process may use only one replica count > 1; other counts run in subprocesses. The strategy
  is shared: a second one over the same devices would restart the collective instance keys and
  clash with the first ("Collective instance 100 expected type 2 ... but got type 0")."""
  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:n]]
  return tf.distribute.MirroredStrategy(devices)


def benchmark_parser(script):
  """The argument parser of a benchmark script (`benchmarks/<name>.py`) that builds one with
  `parser()` (benchmarks/run_settings.py: its run flags generated from config.FLAG_SPECS), else
  None. The docs' checks parse a documented command with it instead of grepping the source."""
  path = os.path.join(REPO, script)
  if "\ndef parser(" not in open(path).read():
    return None
  folder = os.path.dirname(path)
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(os.path.basename(path)[:-3]).parser()


@pytest.fixture
def repo():
  return REPO


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: subprocess / end-to-end runs (skip with -m 'not slow')")


# --- the tests write nothing into the repository -------------------------------------------------
# A user may have run the quickstart (or anything else) in this checkout before the tests: what
# was there is theirs, whatever it is. The rule is a before/after comparison of the tree, not the
# absence of any particular folder.

# Written by tools, not by the tests' subjects: git, the interpreter, pytest and linters.
TOOL_CACHES = frozenset({".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"})


def repo_listing(root=REPO):
  """{relative path: (size, mtime_ns)} of every file under root, tool caches aside."""
  out = {}
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in TOOL_CACHES]
    for name in files:
      path = os.path.join(d, name)
      try:
        st = os.lstat(path)
      except FileNotFoundError:  # removed while we walked
        continue
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def listing_changes(before, after):
  """Sorted 'added|changed|removed <path>' lines between two repo_listing results."""
  lines = [f"added {p}" for p in after.keys() - before.keys()]
  lines += [f"removed {p}" for p in before.keys() - after.keys()]
  lines += [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
  return sorted(lines)


def pytest_sessionstart(session):
  session.config.stash[_LISTING] = repo_listing()


def pytest_sessionfinish(session, exitstatus):
  """Reports any file of the checkout that was added, changed or removed during the run. Under CI
  (a fresh clone nobody edits) that is the tests' doing and fails the run; on a contributor's
  machine it may be their own editing, so it is a warning there."""
  before = session.config.stash.get(_LISTING, None)
  if before is None:
    return
  changes = listing_changes(before, repo_listing())
  if not changes:
    return
  fatal = bool(os.environ.get("CI"))
  text = (f"{'error' if fatal else 'warning'}: the repository checkout changed during the tests "
          "(tests must write only to temporary folders"
          f"{'' if fatal else '; ignore this if you edited files meanwhile'}):\n  "
          + "\n  ".join(changes[:20]))
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter:
    reporter.write_line(text, red=fatal, yellow=not fatal)
  else:
    print(text, file=sys.stderr)
  if fatal:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LISTING = pytest.StashKey[dict]()
