"""Experiment: every flag a field, presets by name, overrides, JSON round trip, validation."""

import dataclasses
import json
import os

import pytest
from absl import flags

from nnclr_tf import cli, flagfiles
from nnclr_tf.config import ALIASES, FLAG_SPECS, SECTIONS, Experiment
from nnclr_tf.errors import ConfigError

PRESETS = flagfiles.presets()


def generated():
  fv = flags.FlagValues()
  cli.define_flags(fv)
  fv(["nnclr-tf"])
  return fv


def test_the_generated_flags_are_the_fields():
  """Only --mode is the CLI's own; every other flag is one field's, with the field's default,
  help and choices; old names are aliases; the library-only fields have no flag."""
  fv = generated()
  assert set(fv) - set(flags.FlagValues()) - {"mode"} == set(FLAG_SPECS) | set(ALIASES)
  for name, spec in FLAG_SPECS.items():
    field = {f.name: f for f in dataclasses.fields(getattr(Experiment(), spec.section))}[
        spec.field]
    assert fv[name].help.endswith(field.metadata["help"]), name  # absl prefixes enum choices
    assert getattr(fv[name].parser, "enum_values", None) == (
        list(field.metadata["choices"]) if field.metadata["choices"] else None), name
  fields = {f"{s}.{f.name}" for s in SECTIONS
            for f in dataclasses.fields(getattr(Experiment(), s))}
  library_only = {"augment.crop", "augment.crop_ratio", "train.steps_per_execution",
                  "export.warmup"}
  assert fields - {f"{s.section}.{s.field}" for s in FLAG_SPECS.values()} == library_only
  fv(["nnclr-tf", "--nolinear_random_init"])
  assert fv.random_init_baseline is False
  assert Experiment.from_flags({"linear_random_init": False}).eval.random_init_baseline is False


def test_the_generated_defaults_are_the_field_defaults():
  fv = generated()
  assert Experiment.from_flags({n: fv[n].value for n in FLAG_SPECS}) == Experiment()
  assert fv["crop_min_scale"].value == Experiment().augment.crop_scale[0]
  assert fv["blur_prob"].value == ["1.0", "0.1"] and fv["export_base"].value == ""


def test_old_json_layouts_still_load():
  """Fields that moved section (temperature, symmetric_loss, random_init_baseline) load from
  JSON written before the move."""
  new = Experiment.from_flags({"temperature": 0.2, "symmetric_loss": True,
                               "random_init_baseline": False})
  raw = json.loads(new.to_json())
  raw["train"]["temperature"] = raw["loss"].pop("temperature")
  raw["support"]["symmetric_loss"] = raw["loss"].pop("symmetric_loss")
  raw["probe"]["linear_random_init"] = raw["eval"].pop("random_init_baseline")
  del raw["loss"]
  assert Experiment.from_json(json.dumps(raw)) == new


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
    # The optimizer's combinations, before any data loads.
    ({"optimizer": "sgd", "lars_clip_lr": True}, "--lars_clip_lr applies to --optimizer=lars"),
    ({"weight_decay_mode": "coupled"}, "--weight_decay_mode=coupled applies to --optimizer=sgd"),
    ({"weight_decay_mode": "both"}, "--weight_decay_mode='both' is unknown"),
    ({"finetune_init": "imagenet"}, "--finetune_init='imagenet' is unknown"),
    ({"eval_crop_fraction": 1.5}, "--eval_crop_fraction=1.5 must be in"),
])
def test_validated_once_with_the_flag_named(values, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
    Experiment.from_flags({"batch_size": 128, "queue_size": 1024, **values})


def test_sections_are_validated_when_made_outside_an_experiment():
  from nnclr_tf.config import LossConfig, OptimConfig
  with pytest.raises(ConfigError, match="--lars_clip_lr applies"):
    OptimConfig(optimizer="adamw", lars_clip_lr=True)
  with pytest.raises(ConfigError, match="--temperature=0"):
    LossConfig(temperature=0)


def test_a_runs_flags_txt_is_a_flagfile(tmp_path):
  """flags.txt (cli.flags_text) reads back as the run's Experiment; absl's own flags, which a
  hand-made flagfile may copy (--verbosity, --nohelp), are ignored; a typo is still an error."""
  fv = generated()
  flagfiles.parse(["nnclr-tf", "--flagfile=quickstart", "--seed=4"], fv)
  text = cli.flags_text(fv)
  assert text.startswith(flagfiles.RUN_FLAGS_HEADER + "\n--mode=pretrain\n")
  assert "--seed=4\n" in text and text.endswith(flagfiles.RUN_FLAGS_END + "\n")
  (tmp_path / "flags.txt").write_text(text + "--nohelp\n--verbosity=-1\n--noonly_check_args\n")
  exp = Experiment.from_flagfile(str(tmp_path / "flags.txt"))
  assert exp == Experiment.from_flagfile("quickstart", seed=4)
  (tmp_path / "bad.txt").write_text(text + "--sed=3\n")
  with pytest.raises(ConfigError, match="unknown flag --sed"):
    Experiment.from_flagfile(str(tmp_path / "bad.txt"))
