"""Lint as part of the README's test command, so CI and a contributor's `pytest` run it alike."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean():
  p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_mypy_is_clean_on_the_public_modules():
  """The modules [tool.mypy] in pyproject.toml lists (config, experiment, model, export, ...)."""
  p = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_make_targets_run_what_contributing_says():
  text = open(os.path.join(REPO, "CONTRIBUTING.md")).read()
  for target in ("test-fast", "test", "lint", "types"):
    p = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    command = p.stdout.strip()
    documented = re.search(rf"^    make {re.escape(target)} +# (.+?)(:|$)", text, re.M).group(1)
    assert command == documented, (target, command, documented)


def test_every_library_module_has_a_test_file():
  """tests/test_<module>.py for each nnclr_tf/<module>.py (the package's __init__: test_package)."""
  import glob
  modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "nnclr_tf", "*.py"))}
  tests = {os.path.basename(p)[5:-3] for p in glob.glob(os.path.join(REPO, "tests", "test_*.py"))}
  assert sorted(modules - {"__init__"} - tests) == []
  assert "package" in tests
