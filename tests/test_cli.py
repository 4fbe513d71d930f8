"""The installed `nnclr-tf` command: a plain (non-editable) install of the wheel, used outside
the repository, finds the presets shipped inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from nnclr_tf import flagfiles


def test_presets_resolve_to_the_packaged_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the repository, where flags/ exists
  packaged = os.path.join(flagfiles.PRESETS_DIR, "quickstart.cfg")
  for name in ("quickstart", "quickstart.cfg", "flags/quickstart.cfg", "/nowhere/quickstart.cfg"):
    assert flagfiles.resolve_preset(name) == packaged
  mine = tmp_path / "quickstart.cfg"
  mine.write_text("--seed=1\n")
  assert flagfiles.resolve_preset(str(mine)) == str(mine)  # a file that exists is never replaced
  assert flagfiles.resolve_preset("no_such_preset") == "no_such_preset"  # absl reports it
  assert set(flagfiles.presets()) >= {"quickstart", "cifar10_resnet18", "imagenet_resnet50"}


@pytest.mark.slow
def test_installed_wheel_runs_the_quickstart_outside_the_repo(tmp_path):
  wheels = tmp_path / "wheels"
  # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", "notebooks"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=300)
  (wheel,) = list(wheels.glob("nnclr_tf-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert "nnclr_tf/flags/quickstart.cfg" in names
  entry = [n for n in names if n.endswith("entry_points.txt")]
  assert "nnclr-tf = nnclr_tf.cli:run" in zipfile.ZipFile(wheel).read(entry[0]).decode()
  # The wheel alone in a folder on PYTHONPATH, which comes before this interpreter's
  # site-packages (and the repository's editable install); TensorFlow & co. come from there.
  target = tmp_path / "installed"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  "--ignore-installed", f"--target={target}", str(wheel)], check=True,
                 capture_output=True, timeout=300)
  env = {**os.environ, "PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "2"}
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  p = subprocess.run([str(target / "bin" / "nnclr-tf"), "--mode=pretrain",
                      "--flagfile=flags/quickstart.cfg", "--train_steps=2", "--noplots",
                      "--model_dir=runs/qs", "--width=8", "--proj_hidden_dim=32",
                      "--pred_hidden_dim=32", "--verbose=0"], cwd=elsewhere, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  where = subprocess.run([sys.executable, "-c", "import nnclr_tf; print(nnclr_tf.__file__)"],
                         cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
  assert where.startswith(str(target)), where  # the installed copy, not the repository's
  assert (elsewhere / "runs" / "qs" / "pretrain_results.json").exists()
