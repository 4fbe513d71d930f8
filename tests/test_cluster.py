"""Who the chief is, by TF_CONFIG (before TensorFlow loads) and by the same rule for a strategy."""

import json

import pytest

from nnclr_tf import cluster
from nnclr_tf.errors import StrategyError


def tf_config(kind, index, jobs=("worker",)):
  return json.dumps({"cluster": {j: ["a:1", "b:1"] for j in jobs},
                     "task": {"type": kind, "index": index}})


def test_the_chief_is_the_chief_task_else_worker_0():
  assert cluster.is_chief_process(tf_config("worker", 0))
  assert not cluster.is_chief_process(tf_config("worker", 1))
  assert cluster.is_chief_process(tf_config("chief", 0, ("chief", "worker")))
  assert not cluster.is_chief_process(tf_config("worker", 0, ("chief", "worker")))
  assert cluster.is_chief_process("")  # no cluster: every process is its own chief
  assert cluster.is_chief_process("{not json")  # the strategy reports it


def test_a_missing_or_malformed_tf_config_is_one_line_naming_an_example():
  with pytest.raises(StrategyError, match="needs the TF_CONFIG environment variable"):
    cluster.check_tf_config("")
  with pytest.raises(StrategyError, match="is not a cluster with this task in it; e.g."):
    cluster.check_tf_config(tf_config("worker", 2))
  cluster.check_tf_config(tf_config("worker", 1))
