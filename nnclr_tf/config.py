"""Frozen configuration dataclasses and the `Experiment` that holds one of each.

Library code takes these objects (or explicit arguments); only `nnclr_tf/cli.py` reads absl flags.
Every command-line flag is a field of one section of `Experiment` (`FLAG_FIELDS` maps the names),
so a notebook, a benchmark or a test builds the same run the CLI does:

  exp = Experiment.from_flagfile("flags/quickstart.cfg", train_steps=40, model_dir="/tmp/q")
  results = nnclr_tf.experiment.pretrain(exp)

An Experiment is validated once, when it is made: a value that cannot work raises ConfigError
naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from nnclr_tf.errors import ConfigError

# Backbone names (backbones.build_backbone builds them); here so the CLI lists them without
# importing Keras. keras_*: keras.applications ResNets.
BACKBONES = ("resnet50", "resnet18_cifar", "small_cnn", "keras_resnet50", "keras_resnet101",
             "keras_resnet152", "keras_resnet50v2", "keras_resnet101v2", "keras_resnet152v2")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"            # digits | folder | numpy | <any tfds image dataset name>
  image_dir: str | None = None     # --dataset=folder
  eval_image_dir: str | None = None
  val_images: int = 0                 # carve a seeded class-balanced held-out set of this size
  data_dir: str | None = None      # tfds data_dir
  train_split: str = "train"
  eval_split: str = "test"
  # tfds split of kNN's bank and the supervised evaluations' training set ('': the training
  # split). STL-10 pretrains on train+unlabelled but only `train` carries labels.
  knn_train_split: str = ""
  image_size: int = 32
  cache_limit_mb: int = 2048          # decoded images are held in memory when they fit this
  # Evaluation view (augment.eval_transform): 1.0 resizes the whole image to image_size (the
  # published figures); f < 1 resizes the shorter side to image_size / f and centre-crops
  # image_size (ImageNet protocol: 0.875, 256 -> 224).
  eval_crop_fraction: float = 1.0
  skip_bad_images: bool = True


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """BYOL asymmetric augmentation (Grill et al. 2020), as used by NNCLR (paper, appendix).

  Two-element tuples are (view1, view2) probabilities.
  """
  crop: bool = True
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: tuple[float, float] = (1.0, 0.1)
  solarize_prob: tuple[float, float] = (0.0, 0.2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = "resnet50"                   # backbones.BACKBONES
  proj_hidden_dim: int = 2048
  proj_layers: int = 3                         # paper: 3 layers [2048, 2048, 256]
  pred_hidden_dim: int = 4096                  # paper: [4096, 256]
  embedding_dim: int = 256
  global_bn: bool = True                       # synchronised BN across replicas (paper)
  width: int = 64                              # base width of small_cnn / resnet18_cifar
  # Each residual block's last BN starts at gamma 0 (SimCLR/BYOL); PyTorch recipes start it at 1.
  zero_init_residual: bool = True


@dataclasses.dataclass(frozen=True)
class SupportSetConfig:
  queue_size: int = 98304
  nn_topk: int = 1
  use_nn: bool = True          # False: the positive is the other view itself (SimCLR ablation)
  # Paper Sec. 3.2: also softmax each prediction over the batch's neighbours. Kept with the
  # support set (what the positives are and how they are scored), not in ModelConfig, which is
  # the architecture a checkpoint must fit: this changes no variable.
  symmetric_loss: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "lars"      # lars | sgd | adamw
  learning_rate: float = 0.3   # base lr, scaled by global_batch / 256 (see lr_scaling)
  lr_scaling: str = "linear"   # linear | sqrt | none
  weight_decay: float = 1e-6
  # sgd only. decoupled: Keras SGD, w -= lr*wd*w, biases/BN excluded. coupled: PyTorch SGD,
  # wd*w added to the gradient before momentum, every variable decayed (lightly's CIFAR recipe).
  weight_decay_mode: str = "decoupled"
  momentum: float = 0.9
  lars_eta: float = 0.001
  lars_clip_lr: bool = False   # LARC clip (solo-learn CIFAR): per-layer rate min(trust, lr)
  warmup_epochs: float = 10.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model_dir: str = "/tmp/nnclr"
  batch_size: int = 4096          # global, across all replicas and workers
  train_epochs: int = 1000
  train_steps: int = 0            # > 0 overrides train_epochs
  temperature: float = 0.1
  seed: int = 0
  checkpoint_every_steps: int = 0  # 0: only at epoch ends
  keep_checkpoints: int = 3
  jit_compile: bool = False
  steps_per_execution: int = 1
  verbose: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  knn_k: int = 200
  knn_temperature: float = 0.1
  batch_size: int = 256
  # kNN and linear_eval also score the architecture at random initialisation (*_random_init):
  # one more forward pass over the train and eval splits
  random_init_baseline: bool = True


def to_dict(*configs) -> dict:
  """Flattens configs into {ClassName: fields} for JSON."""
  return {type(c).__name__: dataclasses.asdict(c) for c in configs}


def dumps(*configs) -> str:
  return json.dumps(to_dict(*configs), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """TF Serving exports: `<base>/<encoder|classifier>/<version>/`."""
  base: str = "/tmp/nnclr/export"  # run.py: --export_base, default <model_dir>/export
  version: int = 0                 # 0: one past the newest; an existing version is refused
  warmup: bool = True              # write assets.extra/tf_serving_warmup_requests


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The online linear probe during pretraining and the offline one of linear_eval."""
  online_probe: bool = True          # only when the training data is labelled
  online_probe_lr: float = 1e-2      # its own Adam, constant lr
  linear_l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # several: chosen on 10% of train


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  label_fraction: float = 0.1        # class-balanced labelled fraction
  epochs: int = 0                    # 0: SimCLR's 60 for <=1% labels, else 30 (>= 300 steps)
  batch_size: int = 256              # global; capped at the subset
  learning_rate: float = 0.05        # x batch/256 (SimCLR: 0.05)
  init: str = "pretrained"           # pretrained | random (the from-scratch baseline)


@dataclasses.dataclass(frozen=True)
class PlotsConfig:
  enabled: bool = True               # pretrain writes the plots into model_dir/plots at the end
  tsne_points: int = 2000


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  strategy: str = "auto"             # auto | mirrored | multi_worker | tpu | one_device
  cpu_replicas: int = 1              # split the CPU into N logical devices
  tpu: str | None = None
  mixed_precision: str = "none"      # none | bf16 | fp16
  deterministic: bool = False        # TF op determinism


SECTIONS = ("data", "augment", "model", "support", "optim", "train", "eval", "probe", "finetune",
            "plots", "export", "runtime")

# flag name -> "section.field" (the field has the flag's name unless listed otherwise here).
# Old flag names still accepted (absl aliases in the CLI, keys of from_flags): old -> new.
FLAG_ALIASES: dict[str, str] = {"linear_random_init": "random_init_baseline"}

FLAG_FIELDS: dict[str, str] = {
    **{f: f"data.{f}" for f in ("dataset", "image_dir", "eval_image_dir", "val_images", "data_dir",
                                "train_split", "eval_split", "knn_train_split", "image_size",
                                "cache_limit_mb", "skip_bad_images", "eval_crop_fraction")},
    "crop_min_scale": "augment.crop_scale",
    **{f: f"augment.{f}" for f in ("flip_prob", "jitter_prob", "brightness", "contrast",
                                   "saturation", "hue", "grayscale_prob", "blur_prob",
                                   "solarize_prob")},
    **{f: f"model.{f}" for f in ("backbone", "width", "proj_hidden_dim", "proj_layers",
                                 "pred_hidden_dim", "embedding_dim", "global_bn",
                                 "zero_init_residual")},
    **{f: f"support.{f}" for f in ("queue_size", "nn_topk", "use_nn", "symmetric_loss")},
    **{f: f"optim.{f}" for f in ("optimizer", "learning_rate", "lr_scaling", "weight_decay",
                                 "weight_decay_mode", "momentum", "lars_eta", "lars_clip_lr",
                                 "warmup_epochs")},
    **{f: f"train.{f}" for f in ("model_dir", "batch_size", "train_epochs", "train_steps",
                                 "temperature", "seed", "checkpoint_every_steps",
                                 "keep_checkpoints", "jit_compile", "verbose")},
    "knn_k": "eval.knn_k", "knn_temperature": "eval.knn_temperature",
    "eval_batch_size": "eval.batch_size", "random_init_baseline": "eval.random_init_baseline",
    **{f: f"probe.{f}" for f in ("online_probe", "online_probe_lr", "linear_l2")},
    "label_fraction": "finetune.label_fraction", "finetune_epochs": "finetune.epochs",
    "finetune_batch_size": "finetune.batch_size", "finetune_lr": "finetune.learning_rate",
    "finetune_init": "finetune.init",
    "plots": "plots.enabled", "plot_tsne_points": "plots.tsne_points",
    "export_base": "export.base", "export_version": "export.version",
    **{f: f"runtime.{f}" for f in ("strategy", "cpu_replicas", "tpu", "mixed_precision",
                                   "deterministic")},
}


def _floats(value, flag, count=None):
  """A list/tuple of numbers or of numeric strings ("1.0", "0.1") -> tuple of floats."""
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  try:
    out = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    out = ()
  if not out or (count is not None and len(out) != count):
    want = "two probabilities, e.g. 1.0,0.1" if count == 2 else "numbers, e.g. 1e-4,1e-3"
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    raise ConfigError(f"--{flag}={text}: give {want}")
  return out


def _to_field(flag, value, model_dir):
  """A flag's value as its config field holds it."""
  if flag == "crop_min_scale":
    return (float(value), 1.0)
  if flag in ("blur_prob", "solarize_prob"):
    return _floats(value, flag, 2)
  if flag == "linear_l2":
    return _floats(value, flag)
  if flag == "export_base":
    return value or os.path.join(model_dir, "export")
  return value


def _to_flag(flag, value):
  if flag == "crop_min_scale":
    return value[0]
  if flag in ("blur_prob", "solarize_prob", "linear_l2"):
    return list(value)
  return value


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run's whole configuration: a section per concern, every flag a field (FLAG_FIELDS)."""
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  model: ModelConfig = ModelConfig()
  support: SupportSetConfig = SupportSetConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  probe: ProbeConfig = ProbeConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  plots: PlotsConfig = PlotsConfig()
  export: ExportConfig = ExportConfig()
  runtime: RuntimeConfig = RuntimeConfig()

  def __post_init__(self):
    validate(self)

  # --- by flag name ------------------------------------------------------------------------------

  @classmethod
  def from_flags(cls, values: dict[str, Any], base: Experiment | None = None) -> Experiment:
    """The Experiment of `base` (default: every default) with `values` {flag name: value} set.

    Without an explicit export_base the exports go to <model_dir>/export."""
    base = base or _DEFAULT
    values = {FLAG_ALIASES.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FLAG_FIELDS))
    if unknown:
      raise ConfigError(f"unknown flag {', '.join('--' + u for u in unknown)}; see "
                        "nnclr-tf --helpfull")
    model_dir = values.get("model_dir", base.train.model_dir)
    if "export_base" not in values and base.export.base == os.path.join(base.train.model_dir,
                                                                           "export"):
      values = {**values, "export_base": None}  # follows the model_dir
    changes: dict[str, dict[str, Any]] = {}
    for flag, value in values.items():
      section, field = FLAG_FIELDS[flag].split(".")
      changes.setdefault(section, {})[field] = _to_field(flag, value, model_dir)
    return dataclasses.replace(base, **{
        name: dataclasses.replace(getattr(base, name), **fields)
        for name, fields in changes.items()})

  @classmethod
  def from_flagfile(cls, path: str, **overrides) -> Experiment:
    """The Experiment a `--flagfile` preset describes, with `overrides` by flag name, e.g.
    `Experiment.from_flagfile("flags/quickstart.cfg", train_steps=40, model_dir="/tmp/q")`.

    A preset name ("quickstart") or a path that does not exist but names a preset shipped with the
    package ("flags/quickstart.cfg") reads the packaged file."""
    from nnclr_tf import cli  # absl parses the file exactly as the command line would
    return cls.from_flags({**cli.flagfile_values(path), **overrides})

  def flag_values(self) -> dict[str, Any]:
    """{flag name: value} of every flag (the inverse of from_flags)."""
    out = {}
    for flag, where in FLAG_FIELDS.items():
      section, field = where.split(".")
      out[flag] = _to_flag(flag, getattr(getattr(self, section), field))
    return out

  def replace(self, **values) -> Experiment:
    """A copy with some flags changed, by flag name (validated again)."""
    return Experiment.from_flags(values, base=self)

  # --- JSON --------------------------------------------------------------------------------------

  def to_json(self) -> str:
    return json.dumps({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS},
                      indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Experiment:
    raw = json.loads(text)
    probe = raw.get("probe", {})
    if "linear_random_init" in probe:  # written before eval.random_init_baseline replaced it
      raw.setdefault("eval", {}).setdefault("random_init_baseline",
                                            probe.pop("linear_random_init"))
    sections = {}
    for name in SECTIONS:
      section_cls = type(getattr(_DEFAULT, name))
      fields = {f.name: f for f in dataclasses.fields(section_cls)}
      kwargs = {}
      for key, value in raw.get(name, {}).items():
        if key not in fields:
          raise ConfigError(f"unknown config field {name}.{key}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
      sections[name] = section_cls(**kwargs)
    return cls(**sections)


def check_batch(global_batch, queue_size, replicas=1, nn_topk=1):
  """Batch / support-set / replica consistency (static shapes need exact multiples)."""
  if global_batch <= 0:
    raise ConfigError(f"--batch_size={global_batch} must be positive")
  if global_batch % replicas:
    raise ConfigError(f"--batch_size={global_batch} must be divisible by the {replicas} replicas; "
                      f"use a multiple of {replicas}")
  if queue_size < global_batch:
    raise ConfigError(f"--queue_size={queue_size} is smaller than --batch_size={global_batch}; "
                      "the support set must hold at least one global batch")
  if queue_size % global_batch:
    raise ConfigError(f"--queue_size={queue_size} must be a multiple of --batch_size="
                      f"{global_batch} (static-shape enqueue); try "
                      f"{max(1, queue_size // global_batch) * global_batch}")
  if not 1 <= nn_topk <= queue_size:
    raise ConfigError(f"--nn_topk={nn_topk} must be between 1 and --queue_size={queue_size}")


def _choice(flag, value, choices):
  if value not in choices:
    raise ConfigError(f"--{flag}={value!r} is unknown; choose one of {', '.join(choices)}")


def validate(exp: Experiment):
  """Every check that needs no data, device or file; ConfigError names the flag and the fix."""
  d, a, t, o = exp.data, exp.augment, exp.train, exp.optim
  if t.temperature <= 0:
    raise ConfigError(f"--temperature={t.temperature} must be > 0 (the paper uses 0.1)")
  if not 0 < d.eval_crop_fraction <= 1:
    raise ConfigError(f"--eval_crop_fraction={d.eval_crop_fraction} must be in (0, 1] (ImageNet "
                      "protocol: 0.875; 1.0 resizes the whole image)")
  if d.image_size < 8:
    raise ConfigError(f"--image_size={d.image_size} is too small; use 8 or more")
  if not 0 < a.crop_scale[0] <= 1:
    raise ConfigError(f"--crop_min_scale={a.crop_scale[0]} must be in (0, 1]")
  if t.train_steps < 0 or t.train_epochs < 0:
    raise ConfigError("--train_steps and --train_epochs must be >= 0")
  if d.dataset == "folder" and not d.image_dir:
    raise ConfigError("--dataset=folder needs --image_dir=<folder of images>")
  if d.knn_train_split and d.dataset in ("digits", "folder", "numpy"):
    raise ConfigError(f"--knn_train_split names a tfds split; --dataset={d.dataset} has none "
                      "(leave it empty)")
  if d.knn_train_split and d.val_images:
    # The held-out images are carved from --train_split; another split as the bank could hold
    # them too.
    raise ConfigError("--knn_train_split cannot go with --val_images; use --eval_split")
  if exp.export.version < 0:
    raise ConfigError(f"--export_version={exp.export.version} must be >= 0 (0: the next version)")
  for flag in ("flip_prob", "jitter_prob", "grayscale_prob"):
    if not 0 <= getattr(a, flag) <= 1:
      raise ConfigError(f"--{flag}={getattr(a, flag)} must be a probability in [0, 1]")
  for flag in ("blur_prob", "solarize_prob"):
    pair = getattr(a, flag)
    if len(pair) != 2 or not all(0.0 <= v <= 1.0 for v in pair):
      raise ConfigError(f"--{flag}={','.join(f'{v:g}' for v in pair)}: give two probabilities "
                        "in [0,1], e.g. 1.0,0.1")
  if not (math.isfinite(o.learning_rate) and o.learning_rate > 0):
    raise ConfigError(f"--learning_rate={o.learning_rate} must be a finite number > 0")
  _choice("optimizer", o.optimizer, ("lars", "sgd", "adamw"))
  _choice("lr_scaling", o.lr_scaling, ("linear", "sqrt", "none"))
  if t.keep_checkpoints < 1:
    raise ConfigError(f"--keep_checkpoints={t.keep_checkpoints} must be >= 1")
  if t.checkpoint_every_steps < 0:
    raise ConfigError(f"--checkpoint_every_steps={t.checkpoint_every_steps} must be >= 0 "
                      "(0: only at epoch ends)")
  if not exp.probe.linear_l2 or min(exp.probe.linear_l2) <= 0:
    raise ConfigError(f"--linear_l2={','.join(f'{v:g}' for v in exp.probe.linear_l2)}: give "
                      "positive numbers, e.g. 1e-4,1e-3")
  _choice("finetune_init", exp.finetune.init, ("pretrained", "random"))
  _choice("strategy", exp.runtime.strategy,
          ("auto", "mirrored", "multi_worker", "tpu", "one_device"))
  _choice("mixed_precision", exp.runtime.mixed_precision, ("none", "bf16", "fp16"))
  if exp.runtime.cpu_replicas < 1:
    raise ConfigError(f"--cpu_replicas={exp.runtime.cpu_replicas} must be >= 1")
  check_batch(t.batch_size, exp.support.queue_size, 1, exp.support.nn_topk)


_DEFAULT = Experiment(export=ExportConfig(base=os.path.join(TrainConfig().model_dir, "export")))
