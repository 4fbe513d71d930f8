"""Who is who in a multi-worker cluster, from TF_CONFIG or a strategy's cluster resolver.

Free of TensorFlow: the CLI decides whether this process takes the model_dir lock before
TensorFlow is imported, and distributed.py asks the same rule of a running strategy.
"""

from __future__ import annotations

import json
import os

from nnclr_tf.errors import StrategyError

TF_CONFIG_EXAMPLE = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


def is_chief_task(task_type, task_id, cluster) -> bool:
  """The chief owns model_dir: the `chief` task, else worker 0 of a cluster (its job names,
  `cluster`) without one; a process with no task type is its own chief."""
  if not task_type or task_type == "chief":
    return True
  return task_type == "worker" and int(task_id or 0) == 0 and "chief" not in cluster


def is_chief_process(tf_config=None) -> bool:
  """is_chief_task of this process by TF_CONFIG (the environment's unless given); a malformed
  TF_CONFIG counts as no cluster here (the strategy reports it)."""
  text = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
  try:
    cfg = json.loads(text) if text else {}
  except ValueError:
    return True
  task = cfg.get("task") or {}
  return is_chief_task(task.get("type"), task.get("index", 0), cfg.get("cluster") or {})


def check_tf_config(text):
  """Refuses a missing or malformed TF_CONFIG for --strategy=multi_worker (without one, TF would
  silently train a single worker)."""
  if not text:
    raise StrategyError("--strategy=multi_worker needs the TF_CONFIG environment variable on "
                        f"every worker, {TF_CONFIG_EXAMPLE}")
  try:
    cfg = json.loads(text)
    cluster, task = cfg["cluster"], cfg["task"]
    hosts = cluster[task["type"]]
    ok = isinstance(hosts, list) and 0 <= int(task["index"]) < len(hosts)
  except (ValueError, KeyError, TypeError):
    ok = False
  if not ok:
    raise StrategyError(f"TF_CONFIG={text!r} is not a cluster with this task in it; "
                        f"{TF_CONFIG_EXAMPLE}")
