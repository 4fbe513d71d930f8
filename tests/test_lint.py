"""Lint as part of the README's test command, so CI and a contributor's `pytest` run it alike."""

import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean():
  p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
