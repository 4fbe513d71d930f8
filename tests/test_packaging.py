"""setup.py exists for tools that look for it, and declares nothing: pyproject.toml is the one
place the package is described."""

import ast
import os
import subprocess
import sys

import tomllib

from conftest import REPO

SETUP = os.path.join(REPO, "setup.py")


def pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_setup_py_version_is_pyprojects():
  p = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.strip().splitlines()[-1] == pyproject()["project"]["version"]


def test_setup_py_declares_nothing_of_its_own():
  """Its only statements: a docstring, `from setuptools import setup`, a bare `setup()`."""
  tree = ast.parse(open(SETUP).read())
  body = [node for node in tree.body
          if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
  assert [ast.dump(node) for node in body] == [
      ast.dump(ast.parse("from setuptools import setup").body[0]),
      ast.dump(ast.parse("setup()").body[0])]
