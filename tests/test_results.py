"""The typed results: every key a run writes is declared, and the CLI's summary reads only
declared keys (a misspelt key would silently drop its line)."""

import json
import os

import pytest

from conftest import REPO
from nnclr_tf import cli, results
from nnclr_tf.config import Experiment


class Recorder(dict):
  """A results dict that remembers which keys were read."""

  def __init__(self, *a):
    super().__init__(*a)
    self.read = set()

  def get(self, key, default=None):
    self.read.add(key)
    return super().get(key, default)

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


@pytest.mark.parametrize("mode", sorted(results.RESULTS))
def test_the_summary_reads_only_declared_keys(mode, tmp_path):
  sample = {k: 0.5 for k in results.declared_keys(mode)}
  sample.update({k: str(tmp_path / "x") for k in sample if k.endswith("_dir") or k in (
      "checkpoint", "probe", "feature_cache")})
  if "knn_curve" in sample:
    sample["knn_curve"] = [{"step": 4, "knn_top1": 0.5}]
  if "plots" in sample:
    sample["plots"] = {"retrieval_grid": str(tmp_path / "plots" / "grid.png")}
  if "scored_steps" in sample:
    sample["scored_steps"] = [4, 8]
  r = Recorder(sample)
  text = cli.summary(mode, Experiment(), r)
  assert r.read <= results.declared_keys(mode), r.read - results.declared_keys(mode)
  want = {"pretrain": "kNN top-1 0.500", "knn_eval": "kNN top-1 0.500",
          "linear_eval": "linear probe top-1 0.500", "finetune": "fine-tuned top-1 0.500",
          "export": "export:", "plots": "plots:",
          "continuous_eval": "2 checkpoint(s) scored, last step 0.5, kNN top-1 0.500"}[mode]
  assert want in text, text


def test_a_0_2_0_pretrain_results_file_holds_only_declared_keys():
  with open(os.path.join(REPO, "tests", "data", "model_dir_0.2.0", "pretrain_results.json")) as f:
    recorded = json.load(f)
  assert set(recorded) <= results.declared_keys("pretrain")
  assert {"steps", "final_loss", "knn_top1", "export_dir"} <= set(recorded)
