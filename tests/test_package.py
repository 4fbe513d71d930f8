"""`import nnclr_tf` stays light: the CLI takes the model_dir lock and filters TensorFlow's
start-up lines before TensorFlow loads, and the TensorFlow-backed names load on first use."""

import subprocess
import sys

from conftest import REPO


def test_importing_the_package_and_the_cli_loads_no_tensorflow():
  code = ("import sys, nnclr_tf, nnclr_tf.cli; print('tensorflow' in sys.modules, "
          "'keras' in sys.modules); nnclr_tf.NNCLR; print('tensorflow' in sys.modules)")
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["False", "False", "True"]
