"""NNCLRConfig: written once, the model's get_config payload, what model_config.json records; a
model_dir written before it existed (tests/data/model_dir_0.2.0) still restores."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from nnclr_tf import building, checkpoints, config, experiment, pretraining
from nnclr_tf import model_dir as md
from nnclr_tf.errors import ConfigError
from nnclr_tf.model import NNCLR
from nnclr_tf.model_config import ARCHITECTURE, FIELDS, NNCLRConfig, architecture

OLD = os.path.join(REPO, "tests", "data", "model_dir_0.2.0")
OLD_FLAGS = dict(width=8, proj_hidden_dim=32, pred_hidden_dim=32, embedding_dim=16,
                 queue_size=128, online_probe=False, random_init_baseline=False, plots=False)


def test_defaults_are_the_experiments_but_the_backbone():
  exp = config.Experiment()
  defaults = NNCLRConfig()
  assert experiment.nnclr_config(exp) == dataclasses.replace(defaults, backbone="resnet50")
  assert defaults.backbone == "small_cnn"  # the Python API's quick default


def test_every_field_is_set_from_one_section():
  """A model setting reaches NNCLRConfig by name from exactly one section: change each flag and
  see it arrive."""
  exp = config.Experiment.from_flags(dict(batch_size=64, queue_size=128))
  for name, section in building.MODEL_FIELD_SECTIONS.items():
    value = getattr(getattr(exp, section), name)
    changed = {bool: lambda v: not v, int: lambda v: v + 64, float: lambda v: v / 2,
               str: lambda v: "small_cnn"}[type(value)](value)
    spec = next(s for s in config.FLAG_SPECS.values() if (s.section, s.field) == (section, name))
    got = experiment.nnclr_config(exp.replace(**{spec.name: spec.to_flag(changed)}))
    assert getattr(got, name) == changed, name
  assert set(building.MODEL_FIELD_SECTIONS) == set(FIELDS) - {"online_probe_classes"}


def test_get_config_is_the_config_and_round_trips():
  model = NNCLR(backbone="small_cnn", image_size=16, width=8, queue_size=64, embedding_dim=16,
                proj_hidden_dim=32, pred_hidden_dim=32, proj_layers=2, symmetric_loss=True)
  cfg = model.get_config()
  assert {k: cfg[k] for k in FIELDS} == model.config.to_dict()
  assert set(cfg) - set(FIELDS) == {"name", "trainable", "dtype"}
  assert NNCLR.from_config(cfg).config == model.config
  assert NNCLR(model.config).config == model.config


def test_invalid_values_are_refused_with_the_experiments_error():
  with pytest.raises(ConfigError, match="--temperature=0"):
    NNCLRConfig(temperature=0.0)
  with pytest.raises(ConfigError, match="--nn_topk=65"):
    NNCLRConfig(queue_size=64, nn_topk=65)


def test_an_older_record_means_the_defaults_of_later_fields():
  old = {"backbone": "resnet18_cifar", "width": 8, "name": "nnclr"}
  arch = architecture(old)
  assert arch["symmetric_loss"] is False and arch["zero_init_residual"] is True
  assert "online_probe_classes" not in architecture({**old, "online_probe_classes": 10})
  assert set(ARCHITECTURE) <= set(arch)


def test_a_model_dir_of_0_2_0_restores_and_evaluates(tmp_path):
  """Written by the code before NNCLRConfig and the generated flags: today's code accepts its
  model_config.json, restores its checkpoint exactly, and kNN-evaluates it."""
  d = str(tmp_path / "old")
  shutil.copytree(OLD, d)
  exp = config.Experiment.from_flagfile("quickstart", model_dir=d, **OLD_FLAGS)
  recorded = json.load(open(os.path.join(d, md.MODEL_CONFIG)))
  model = experiment.build_model(exp)
  assert architecture(model.get_config()) == {**architecture(recorded), "name": model.name}
  pretraining.prepare_model_dir(d, model)  # the same architecture: accepted, file unchanged
  assert json.load(open(os.path.join(d, md.MODEL_CONFIG))) == recorded
  checkpoints.restore(model, checkpoints.latest_checkpoint(d), strict=True)
  reader = tf.train.load_checkpoint(os.path.join(d, "ckpt-2"))
  for name in ("embeddings", "labels", "pointer"):
    saved = reader.get_tensor(f"model/support_set/{name}/.ATTRIBUTES/VARIABLE_VALUE")
    restored = next(v for v in model.support_set.weights if v.path.endswith(name))
    np.testing.assert_array_equal(restored.numpy(), saved)
  assert np.abs(reader.get_tensor("model/support_set/embeddings/.ATTRIBUTES/VARIABLE_VALUE")).sum()
  results = experiment.knn_eval(exp)
  assert results["checkpoint"].endswith("ckpt-2") and 0.5 < results["knn_top1"] <= 1
