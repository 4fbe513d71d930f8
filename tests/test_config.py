"""Experiment: every flag a field, presets by name, overrides, JSON round trip, validation."""

import dataclasses
import os

import pytest

from nnclr_tf import cli
from nnclr_tf.config import FLAG_ALIASES, FLAG_FIELDS, SECTIONS, Experiment
from nnclr_tf.errors import ConfigError

PRESETS = cli.presets()


def test_every_cli_flag_is_an_experiment_field_and_back():
  """Only --mode is the CLI's own; every other flag has one field and every field (but the
  library-only ones) one flag; old names are aliases of a flag."""
  fv = cli.flags.FlagValues()
  cli.define_flags(fv)
  cli_flags = set(fv)
  assert cli_flags - set(FLAG_FIELDS) == {"mode", *FLAG_ALIASES}
  assert set(FLAG_ALIASES.values()) <= set(FLAG_FIELDS)
  fv(["nnclr-tf", "--nolinear_random_init"])
  assert fv.random_init_baseline is False
  assert Experiment.from_flags({"linear_random_init": False}).eval.random_init_baseline is False
  assert set(FLAG_FIELDS) <= cli_flags
  fields = {f"{s}.{f.name}" for s in SECTIONS
            for f in dataclasses.fields(getattr(Experiment(), s))}
  library_only = {"augment.crop", "augment.crop_ratio", "train.steps_per_execution",
                  "export.warmup"}
  assert fields - set(FLAG_FIELDS.values()) == library_only


def test_defaults_equal_the_cli_defaults():
  fv = cli.flags.FlagValues()
  cli.define_flags(fv)
  fv(["nnclr-tf"])
  from_cli = Experiment.from_flags({n: fv[n].value for n in FLAG_FIELDS})
  assert from_cli == Experiment()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_by_name_and_path_and_round_trip(preset, repo):
  exp = Experiment.from_flagfile(preset)
  assert exp == Experiment.from_flagfile(os.path.join(repo, "flags", f"{preset}.cfg"))
  assert Experiment.from_json(exp.to_json()) == exp
  assert Experiment.from_flags(exp.flag_values()) == exp


def test_overrides_by_flag_name_and_export_base_follows_model_dir():
  exp = Experiment.from_flagfile("quickstart", train_steps=40, model_dir="/tmp/q",
                                 blur_prob="0.5,0", crop_min_scale=0.2)
  assert exp.train.train_steps == 40 and exp.train.model_dir == "/tmp/q"
  assert exp.export.base == "/tmp/q/export"
  assert exp.augment.blur_prob == (0.5, 0.0) and exp.augment.crop_scale == (0.2, 1.0)
  assert exp.model.backbone == "small_cnn"  # the rest is the preset's
  moved = exp.replace(model_dir="/tmp/r")
  assert moved.export.base == "/tmp/r/export" and moved.train.train_steps == 40
  pinned = exp.replace(export_base="/srv/models").replace(model_dir="/tmp/s")
  assert pinned.export.base == "/srv/models"
  with pytest.raises(dataclasses.FrozenInstanceError):
    exp.train = None


@pytest.mark.parametrize("values,needle", [
    ({"temperature": 0}, "--temperature=0 must be > 0"),
    ({"queue_size": 1000}, "--queue_size=1000 must be a multiple"),
    ({"nn_topk": 0}, "--nn_topk=0"),
    ({"blur_prob": "2"}, "--blur_prob=2: give two probabilities"),
    ({"solarize_prob": (0.0, 1.5)}, "--solarize_prob=0,1.5"),
    ({"linear_l2": "0"}, "--linear_l2=0: give positive numbers"),
    ({"learning_rate": float("inf")}, "--learning_rate=inf"),
    ({"optimizer": "adam"}, "--optimizer='adam' is unknown"),
    ({"batch_szie": 8}, "unknown flag --batch_szie"),
    ({"knn_train_split": "train"}, "--dataset=digits has none"),
    ({"dataset": "stl10", "knn_train_split": "train", "val_images": 500},
     "cannot go with --val_images"),
])
def test_validated_once_with_the_flag_named(values, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
    Experiment.from_flags({"batch_size": 128, "queue_size": 1024, **values})
