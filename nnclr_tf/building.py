"""From an Experiment to what runs: the runtime (strategy, determinism, precision), the model and
the data. experiment.py's modes and the benchmarks build through here, and nowhere else does a
config become a model.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from nnclr_tf import checkpoints, config, data, distributed, model_config
from nnclr_tf import model_dir as md
from nnclr_tf.backbones import build_backbone
from nnclr_tf.config import SECTIONS, Experiment
from nnclr_tf.model import NNCLR
from nnclr_tf.model_config import NNCLRConfig

_STRATEGIES: dict[tuple, Any] = {}  # (kind, cpu replicas, tpu) -> strategy


def quiet_tensorflow():
  """TensorFlow's Python logger at ERROR: its warnings repeat what our own lines say."""
  tf.get_logger().setLevel("ERROR")


def setup(exp: Experiment):
  """Runtime set-up: logical CPU devices (before TensorFlow initialises them), op determinism,
  mixed precision; returns the distribution strategy. One strategy per (kind, devices) and
  process: TF's collectives cannot have two over the same devices."""

  r = exp.runtime
  distributed.split_cpu(r.cpu_replicas)
  if r.deterministic:
    tf.config.experimental.enable_op_determinism()
  if r.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
        {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[r.mixed_precision])
  key = (r.strategy, r.cpu_replicas, r.tpu)
  if key not in _STRATEGIES:
    _STRATEGIES[key] = distributed.make_strategy(r.strategy, r.cpu_replicas, r.tpu)
  strategy = _STRATEGIES[key]
  logging.info("strategy %s with %d replicas", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def strategy_for(exp, strategy):
  return strategy if strategy is not None else setup(exp)


def nnclr_config(exp: Experiment, online_probe_classes=0) -> NNCLRConfig:
  """The NNCLRConfig of the experiment's model: each field from the one section holding a field
  of its name (a new architecture setting needs no line here)."""
  values = {"online_probe_classes": online_probe_classes}
  for name in MODEL_FIELD_SECTIONS:
    values[name] = getattr(getattr(exp, MODEL_FIELD_SECTIONS[name]), name)
  return NNCLRConfig(**values)


def _model_field_sections():
  out = {}
  for name in model_config.FIELDS:
    if name == "online_probe_classes":  # from the data, not the flags
      continue
    (section,) = [s for s in SECTIONS if name in config.SECTION_FIELDS[s]]
    out[name] = section
  return out


MODEL_FIELD_SECTIONS = _model_field_sections()


def build_model(exp: Experiment, strategy=None, online_probe_classes=0):
  """The NNCLR model the experiment describes, built in the strategy's scope. With
  build_encoder, the only place an Experiment becomes a model."""
  strategy = strategy_for(exp, strategy)
  keras.utils.set_random_seed(exp.train.seed)
  with strategy.scope():
    return NNCLR(nnclr_config(exp, online_probe_classes))


def build_encoder(exp: Experiment, seed=None):
  """The experiment's backbone alone, randomly initialised from `seed` (default: the run's seed
  + 1, the random-init baselines' encoder) with local BatchNorm."""
  m, size = exp.model, exp.data.image_size
  keras.utils.set_random_seed(exp.train.seed + 1 if seed is None else seed)
  return build_backbone(m.backbone, (size, size, 3), False, m.width, m.zero_init_residual)


def restored_model(exp: Experiment, strategy=None):
  """(model, checkpoint path) of the model_dir's checkpoint --checkpoint names (default: the
  newest)."""
  md.recorded_model_config(exp.train.model_dir)  # one error line when it is damaged
  chosen = checkpoints.resolve_checkpoint(exp.train.model_dir, exp.train.checkpoint)
  model = build_model(exp, strategy)
  checkpoints.restore(model, chosen)
  return model, chosen


def load_data(exp: Experiment):
  """(train, held-out) sources of the experiment (held-out may be None)."""
  return data.load_sources(exp.data, exp.train.seed)


def eval_data(exp: Experiment):
  """(bank, held-out) of the evaluations: the bank is --knn_train_split when set (the labelled
  part of a partly unlabelled training set), else the training source."""
  train, held = load_data(exp)
  return data.knn_bank_source(exp.data, train), held
