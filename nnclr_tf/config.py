"""The run's schema: frozen config sections, the `Experiment` that holds one of each, and its
validation.

Every setting is one field, declared once with its default, flag name, help text and old names
(`settings.setting`); the CLI's flags are generated from these fields (`define_flags`), so a
notebook, a benchmark or a test builds the same run the CLI does:

  exp = Experiment.from_flagfile("flags/quickstart.cfg", train_steps=40, model_dir="/tmp/q")
  results = nnclr_tf.experiment.pretrain(exp)

Sections are validated when they are made (their own fields) and an Experiment when it is made
(what spans sections): a value that cannot work raises ConfigError naming the flag and the fix.
What needs the replica count or the dataset size is checked when pretraining starts
(`check_batch`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import flags

from nnclr_tf import flagfiles, settings
from nnclr_tf.checks import (
  check_batch,
  check_eval_crop_fraction,
  check_probabilities,
  check_temperature,
  floats,
  pair_of_floats,
)
from nnclr_tf.errors import ConfigError
from nnclr_tf.settings import setting

# Backbone names (backbones.build_backbone builds them); here so the CLI lists them without
# importing Keras. keras_*: keras.applications ResNets.
BACKBONES = ("resnet50", "resnet18_cifar", "small_cnn", "keras_resnet50", "keras_resnet101",
             "keras_resnet152", "keras_resnet50v2", "keras_resnet101v2", "keras_resnet152v2")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = setting("digits", "digits | folder | any prepared tfds image dataset name.")
  image_dir: str | None = setting(None, "--dataset=folder: class sub-folders or a flat folder.")
  eval_image_dir: str | None = setting(None, "--dataset=folder: held-out images for evaluation.")
  val_images: int = setting(0, "Carve a seeded class-balanced held-out set of this size.")
  data_dir: str | None = setting(None, "tfds data_dir (nothing is downloaded).")
  train_split: str = setting("train", "tfds split to pretrain on.")
  eval_split: str = setting("test", "tfds split to evaluate on ('' for none).")
  # STL-10 pretrains on train+unlabelled but only `train` carries labels.
  knn_train_split: str = setting(
      "", "tfds split of the kNN bank and of linear eval / fine-tune training ('': "
      "--train_split), e.g. STL-10's labelled `train` when pretraining on train+unlabelled.")
  image_size: int = setting(32, "Training resolution (square).")
  # augment.eval_transform: f < 1 is the ImageNet protocol (0.875, 256 -> 224).
  eval_crop_fraction: float = setting(
      1.0, "Evaluation and serving: resize the shorter side to image_size / f, centre-crop "
      "image_size (ImageNet: 0.875); 1.0 resizes the whole image.")
  cache_limit_mb: int = setting(2048, "Hold the images in memory up to this size (decoded when "
                                "stored at --image_size, else their encoded bytes).")
  skip_bad_images: bool = setting(True, "Leave undecodable image files out (counted in the "
                                  "results as skipped_images); --noskip_bad_images makes them "
                                  "an error.")

  def __post_init__(self):
    check_eval_crop_fraction(self.eval_crop_fraction)
    if self.image_size < 8:
      raise ConfigError(f"--image_size={self.image_size} is too small; use 8 or more")
    if self.dataset == "folder" and not self.image_dir:
      raise ConfigError("--dataset=folder needs --image_dir=<folder of images>")
    if self.knn_train_split and self.dataset in ("digits", "folder", "numpy"):
      raise ConfigError(f"--knn_train_split names a tfds split; --dataset={self.dataset} has "
                        "none (leave it empty)")
    if self.knn_train_split and self.val_images:
      # The held-out images are carved from --train_split; another split as the bank could
      # hold them too.
      raise ConfigError("--knn_train_split cannot go with --val_images; use --eval_split")


CROP_SAMPLERS = ("inception", "torchvision")
AUGMENT_ON = ("host", "device")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """BYOL asymmetric augmentation (Grill et al. 2020), as used by NNCLR (paper, appendix).

  Two-element tuples are (view1, view2) probabilities.
  """
  crop: bool = True
  crop_scale: tuple[float, float] = setting(
      (0.08, 1.0), "Random resized crop: smallest area fraction.", flag="crop_min_scale",
      parse=lambda v, flag: (float(v), 1.0), render=lambda v: v[0])
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  crop_sampler: str = setting(
      "inception", "Random resized crop box: inception (tf.image's sampler, SimCLR's TF code) or "
      "torchvision (RandomResizedCrop's, the PyTorch recipes'; larger crops at the same scale).",
      choices=CROP_SAMPLERS)
  flip_prob: float = setting(0.5, "Horizontal flip probability.")
  jitter_prob: float = setting(0.8, "Colour jitter probability.")
  brightness: float = setting(0.4, "Colour jitter brightness strength.")
  contrast: float = setting(0.4, "Colour jitter contrast strength.")
  saturation: float = setting(0.2, "Colour jitter saturation strength.")
  hue: float = setting(0.1, "Colour jitter hue strength.")
  grayscale_prob: float = setting(0.2, "Grayscale probability.")
  blur_prob: tuple[float, float] = setting(
      (1.0, 0.1), "Gaussian blur probability for view1,view2.", parse=pair_of_floats)
  solarize_prob: tuple[float, float] = setting(
      (0.0, 0.2), "Solarize probability for view1,view2.", parse=pair_of_floats)
  augment_on: str = setting(
      "host", "Where the colour stage (jitter, grayscale, blur, solarize) runs: host (tf.data, "
      "after batching) or device (in the train step, batched, under the strategy and XLA; the "
      "host sends uint8 crops, the choice for accelerators). Same views either way.",
      choices=AUGMENT_ON)

  def __post_init__(self):
    if not 0 < self.crop_scale[0] <= 1:
      raise ConfigError(f"--crop_min_scale={self.crop_scale[0]} must be in (0, 1]")
    check_probabilities(self, "flip_prob", "jitter_prob", "grayscale_prob")
    for name in ("blur_prob", "solarize_prob"):
      pair = getattr(self, name)
      if len(pair) != 2 or not all(0.0 <= v <= 1.0 for v in pair):
        raise ConfigError(f"--{name}={','.join(f'{v:g}' for v in pair)}: give two "
                          "probabilities in [0,1], e.g. 1.0,0.1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture a checkpoint must fit."""
  backbone: str = setting("resnet50", "Encoder; keras_* are keras.applications ResNets, "
                          "randomly initialised.", choices=BACKBONES)
  width: int = setting(64, "Base channel width of the backbone.")
  proj_hidden_dim: int = setting(2048, "Projection MLP hidden size.")
  proj_layers: int = setting(3, "Projection MLP depth (paper: 3 layers [2048, 2048, 256]).")
  pred_hidden_dim: int = setting(4096, "Prediction MLP hidden size (paper: [4096, 256]).")
  embedding_dim: int = setting(256, "Embedding size d.")
  global_bn: bool = setting(True, "Synchronise BatchNorm statistics across replicas (paper).")
  zero_init_residual: bool = setting(
      True, "Start the last BatchNorm of each residual block at gamma 0, so each block starts "
      "as the identity (SimCLR/BYOL); false = PyTorch recipes' 1.")


@dataclasses.dataclass(frozen=True)
class SupportSetConfig:
  """The support set: what the positives are drawn from."""
  queue_size: int = setting(98304, "Support set size; a multiple of --batch_size.")
  nn_topk: int = setting(1, "Sample the positive uniformly from the top-k neighbours.")
  use_nn: bool = setting(True, "False: the positive is the other view (SimCLR ablation).")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the positives are scored (losses.nnclr_loss); changes no variable."""
  temperature: float = setting(0.1, "InfoNCE temperature.")
  symmetric_loss: bool = setting(
      False, "Add the paper's column term (softmax over the batch's neighbours for each "
      "prediction) to the row-wise InfoNCE (paper Sec. 3.2).")

  def __post_init__(self):
    check_temperature(self.temperature)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = setting("lars", "Optimizer.", choices=("lars", "sgd", "adamw"))
  learning_rate: float = setting(0.3, "Base learning rate (scaled by --lr_scaling).")
  lr_scaling: str = setting("linear", "x B/256, x sqrt(B/256).",
                            choices=("linear", "sqrt", "none"))
  weight_decay: float = setting(1e-6, "Weight decay (LARS, decoupled SGD, AdamW: biases and BN "
                                "excluded).")
  weight_decay_mode: str = setting(
      "decoupled", "SGD: decoupled (w -= lr*wd*w, biases/BN excluded) or coupled (PyTorch SGD: "
      "wd*w added to every gradient, through momentum).", choices=("decoupled", "coupled"))
  momentum: float = setting(0.9, "Momentum (LARS, SGD).")
  lars_eta: float = setting(0.001, "LARS trust coefficient.")
  lars_clip_lr: bool = setting(False, "LARS clip mode (NVIDIA LARC, solo-learn): per-layer rate "
                               "min(eta*||w||/(||g||+wd*||w||), lr).")
  warmup_epochs: float = setting(10.0, "Linear warm-up length in epochs.")

  def __post_init__(self):
    _check_choices(self)
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ConfigError(f"--learning_rate={self.learning_rate} must be a finite number > 0")
    # Combinations that would be silently ignored.
    if self.lars_clip_lr and self.optimizer != "lars":
      raise ConfigError(f"--lars_clip_lr applies to --optimizer=lars only, not "
                        f"--optimizer={self.optimizer}; drop it or use lars")
    if self.weight_decay_mode == "coupled" and self.optimizer != "sgd":
      # LARS always adds its decay to the gradient (before the trust ratio) and AdamW is
      # decoupled by definition: neither has a choice to make.
      raise ConfigError(f"--weight_decay_mode=coupled applies to --optimizer=sgd only, not "
                        f"--optimizer={self.optimizer}; drop it or use sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model_dir: str = setting("/tmp/nnclr", "Checkpoints, logs, exports and results go here.")
  batch_size: int = setting(4096, "Global batch size (all replicas and workers).")
  train_epochs: int = setting(1000, "Epochs to train.")
  train_steps: int = setting(0, "If > 0, overrides --train_epochs.")
  seed: int = setting(0, "Seed for weights, data order and augmentation.")
  checkpoint_every_steps: int = setting(0, "Also checkpoint every N steps (0: epochs only).")
  keep_checkpoints: int = setting(3, "How many checkpoints to keep.")
  keep_checkpoint_every_steps: int = setting(
      0, "Also keep the checkpoint of every N-th step for good, in model_dir/milestones, beside "
      "the last --keep_checkpoints (0: none), for --checkpoint=STEP later.")
  checkpoint: str = setting(
      "", "knn_eval, linear_eval, finetune, plots and export: read this checkpoint instead of the "
      "newest: a step of --model_dir (kept ones and milestones) or a checkpoint path "
      "(.../ckpt-N).")
  jit_compile: bool = setting(False, "Compile the train step with XLA.")
  steps_per_execution: int = 1
  verbose: int = setting(1, "Keras progress: 0 silent, 1 bar, 2 one line per epoch.")

  def __post_init__(self):
    if self.train_steps < 0 or self.train_epochs < 0:
      raise ConfigError("--train_steps and --train_epochs must be >= 0")
    if self.keep_checkpoints < 1:
      raise ConfigError(f"--keep_checkpoints={self.keep_checkpoints} must be >= 1")
    if self.checkpoint_every_steps < 0:
      raise ConfigError(f"--checkpoint_every_steps={self.checkpoint_every_steps} must be >= 0 "
                        "(0: only at epoch ends)")
    if self.keep_checkpoint_every_steps < 0:
      raise ConfigError(f"--keep_checkpoint_every_steps={self.keep_checkpoint_every_steps} must "
                        "be >= 0 (0: keep no milestones)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  knn_k: int = setting(200, "kNN neighbours.")
  knn_temperature: float = setting(0.1, "kNN vote temperature.")
  batch_size: int = setting(256, "Batch size for feature extraction.", flag="eval_batch_size")
  knn_every_steps: int = setting(
      0, "--mode=pretrain: also score kNN (--knn_k, --knn_temperature) of the eval split every N "
      "steps and at the last one, into curves.csv, TensorBoard and training_curves.png (0: off).")
  knn_monitor_bank: int = setting(
      0, "The kNN bank of --knn_every_steps: a seeded class-balanced subset of this many training "
      "images (0: all of them); the final kNN always uses all.")
  eval_timeout: int = setting(
      3600, "--mode=continuous_eval: stop after this many seconds without a new checkpoint.")
  eval_poll_seconds: int = setting(
      10, "--mode=continuous_eval: how often to look for a new checkpoint.")
  continuous_eval_linear: bool = setting(
      False, "--mode=continuous_eval: also fit the linear probe (L-BFGS on the same features) "
      "of each checkpoint.")
  random_init_baseline: bool = setting(
      True, "kNN and linear_eval also score the architecture at random initialisation "
      "(knn_top1_random_init, linear_top1_random_init): one more forward pass over the train "
      "and eval splits.", aliases=("linear_random_init",))

  def __post_init__(self):
    for name in ("knn_every_steps", "knn_monitor_bank"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name}={getattr(self, name)} must be >= 0 (0: off)")
    for name in ("eval_timeout", "eval_poll_seconds"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name}={getattr(self, name)} must be >= 1 (seconds)")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """TF Serving exports: `<base>/<encoder|classifier>/<version>/`."""
  base: str = setting("", "TF Serving model base path (default <model_dir>/export).",
                      flag="export_base")
  version: int = setting(0, "Version to write; 0: one past the newest. An existing version is "
                         "never overwritten.", flag="export_version")
  warmup: bool = True              # write assets.extra/tf_serving_warmup_requests

  def __post_init__(self):
    if self.version < 0:
      raise ConfigError(f"--export_version={self.version} must be >= 0 (0: the next version)")


LINEAR_PROTOCOLS = ("lbfgs", "sgd")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The online linear probe during pretraining and the offline one of linear_eval."""
  online_probe: bool = setting(True, "Train an online linear probe on stop-gradient backbone "
                               "features during pretraining (only when the training data is "
                               "labelled).")
  online_probe_lr: float = setting(1e-2, "Adam learning rate of the online probe.")
  linear_protocol: str = setting(
      "lbfgs", "--mode=linear_eval: lbfgs (L2 logistic regression on standardised un-augmented "
      "features held in memory; exact, no lr) or sgd (SimCLR's protocol: a linear layer on the "
      "frozen encoder trained with Nesterov SGD on streamed random crop + flip views; any dataset "
      "size; the random-init baseline is not fitted).", choices=LINEAR_PROTOCOLS)
  linear_l2: tuple[float, ...] = setting(
      (1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "L2 strengths of the linear probe; several: chosen on 10% "
      "of the train features.", parse=floats)
  linear_lr: float = setting(0.1, "--linear_protocol=sgd: base lr, x batch/256, cosine-decayed "
                             "to 0 (SimCLR: 0.1).")
  linear_epochs: int = setting(90, "--linear_protocol=sgd: epochs (SimCLR: 90).")
  linear_batch_size: int = setting(256, "--linear_protocol=sgd: global batch (SimCLR: 4096).")

  def __post_init__(self):
    _check_choices(self)
    if not self.linear_l2 or min(self.linear_l2) <= 0:
      raise ConfigError(f"--linear_l2={','.join(f'{v:g}' for v in self.linear_l2)}: give "
                        "positive numbers, e.g. 1e-4,1e-3")
    if not (math.isfinite(self.linear_lr) and self.linear_lr > 0):
      raise ConfigError(f"--linear_lr={self.linear_lr} must be a finite number > 0, e.g. 0.1")
    for name in ("linear_epochs", "linear_batch_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name}={getattr(self, name)} must be >= 1")


# SimCLR's published ImageNet label subsets (google-research/simclr imagenet_subsets/1percent.txt
# and 10percent.txt), the lists behind the paper's 1% / 10% fine-tune numbers, as tfds prepares
# them: the train split is the subset, labels are imagenet2012's.
IMAGENET = "imagenet2012"
IMAGENET_SUBSETS = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}


def is_imagenet(dataset: str) -> bool:
  """Whether --dataset names tfds imagenet2012 (any version, e.g. imagenet2012:5.1.0)."""
  return dataset.split(":")[0] == IMAGENET


def imagenet_subset(dataset: str, label_fraction: float) -> str | None:
  """The tfds dataset of SimCLR's published subset that --mode=finetune reads for
  `label_fraction` of ImageNet; None for any other dataset (a class-balanced draw) or
  fraction."""
  if not is_imagenet(dataset):
    return None
  return IMAGENET_SUBSETS.get(round(label_fraction, 9))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  label_fraction: float = setting(
      0.1, "--mode=finetune: labelled fraction: a seeded class-balanced draw, or with "
      "--dataset=imagenet2012 SimCLR's published subset (0.01 or 0.1 only, tfds "
      "imagenet2012_subset/1pct or /10pct).")
  epochs: int = setting(0, "Fine-tune epochs (0: SimCLR's 60 for <=1% labels, else 30, but at "
                        "least 300 steps; no floor on ImageNet's published subsets).",
                        flag="finetune_epochs")
  batch_size: int = setting(256, "Fine-tune global batch (capped at the subset).",
                            flag="finetune_batch_size")
  learning_rate: float = setting(0.05, "Fine-tune base lr, x batch/256 (SimCLR: 0.05).",
                                 flag="finetune_lr")
  momentum: float = setting(0.9, "Fine-tune SGD momentum, Nesterov (SimCLR: 0.9).",
                            flag="finetune_momentum")
  weight_decay: float = setting(
      0.0, "Fine-tune decoupled weight decay, biases and BN excluded (SimCLR: none).",
      flag="finetune_weight_decay")
  init: str = setting("pretrained", "Fine-tune the pretrained encoder, or train from scratch "
                      "(the baseline).", flag="finetune_init", choices=("pretrained", "random"))

  def __post_init__(self):
    _check_choices(self)
    if not 0 < self.label_fraction <= 1:
      raise ConfigError(f"--label_fraction={self.label_fraction} must be in (0, 1], e.g. 0.01 "
                        "or 0.1")
    if not 0 <= self.momentum < 1:
      raise ConfigError(f"--finetune_momentum={self.momentum} must be in [0, 1) (SimCLR: 0.9)")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ConfigError(f"--finetune_weight_decay={self.weight_decay} must be a finite number "
                        ">= 0 (SimCLR: 0)")


@dataclasses.dataclass(frozen=True)
class PlotsConfig:
  enabled: bool = setting(True, "--mode=pretrain: write the plots into model_dir/plots at the "
                          "end.", flag="plots")
  tsne_points: int = setting(2000, "At most this many points in the t-SNE map.",
                             flag="plot_tsne_points")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  strategy: str = setting("auto", "Distribution strategy.",
                          choices=("auto", "mirrored", "multi_worker", "tpu", "one_device"))
  cpu_replicas: int = setting(1, "Split the CPU into N logical devices (Mirrored tests).")
  tpu: str | None = setting(None, "TPU name or address for --strategy=tpu.")
  mixed_precision: str = setting("none", "Compute dtype.", choices=("none", "bf16", "fp16"))
  deterministic: bool = setting(False, "TF op determinism: with --seed, reruns give identical "
                                "losses and weights (no measurable cost on CPU; may be slower "
                                "on GPU).")

  def __post_init__(self):
    _check_choices(self)
    if self.cpu_replicas < 1:
      raise ConfigError(f"--cpu_replicas={self.cpu_replicas} must be >= 1")


def _check_choices(cfg):
  """Enum settings given through the Python API (the CLI's enum flags refuse them already)."""
  for f in dataclasses.fields(cfg):
    choices = f.metadata.get("choices")
    if choices and getattr(cfg, f.name) not in choices:
      raise ConfigError(f"--{f.metadata['flag'] or f.name}={getattr(cfg, f.name)!r} is unknown; "
                        f"choose one of {', '.join(choices)}")


# Where a field moved between sections, as older JSON records it: old "section.field" -> new.
MOVED_FIELDS = {"probe.linear_random_init": "eval.random_init_baseline",
                "train.temperature": "loss.temperature",
                "support.symmetric_loss": "loss.symmetric_loss"}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run's whole configuration: a section per concern, every flag a field."""
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  model: ModelConfig = ModelConfig()
  support: SupportSetConfig = SupportSetConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  probe: ProbeConfig = ProbeConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  plots: PlotsConfig = PlotsConfig()
  export: ExportConfig = ExportConfig()
  runtime: RuntimeConfig = RuntimeConfig()

  def __post_init__(self):
    if not self.export.base:  # the exports follow the model_dir
      object.__setattr__(self, "export", dataclasses.replace(
          self.export, base=os.path.join(self.train.model_dir, "export")))
    check_batch(self.train.batch_size, self.support.queue_size, 1, self.support.nn_topk)
    fraction = self.finetune.label_fraction
    if is_imagenet(self.data.dataset) and not imagenet_subset(self.data.dataset, fraction):
      # A draw of our own could not be compared with any published number, and drawing it
      # class-balanced would read the labels of all 1.28M streamed training images.
      raise ConfigError(
          f"--label_fraction={fraction:g} with --dataset={self.data.dataset}: ImageNet "
          "fine-tunes on SimCLR's published subsets only (tfds imagenet2012_subset/1pct, "
          "/10pct); use --label_fraction=0.01 or 0.1")

  # --- by flag name ------------------------------------------------------------------------------

  @classmethod
  def from_flags(cls, values: dict[str, Any], base: Experiment | None = None) -> Experiment:
    """The Experiment of `base` (default: every default) with `values` {flag name: value} set.

    Without an explicit export_base the exports go to <model_dir>/export."""
    base = base or Experiment()
    values = {ALIASES.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FLAG_SPECS))
    if unknown:
      raise ConfigError(f"unknown flag {', '.join('--' + u for u in unknown)}; see "
                        "nnclr-tf --helpfull")
    if not values.get("export_base") and base.export.base == os.path.join(
        base.train.model_dir, "export"):
      values = {**values, "export_base": ""}  # follows the model_dir
    changes: dict[str, dict[str, Any]] = {}
    for flag, value in values.items():
      spec = FLAG_SPECS[flag]
      changes.setdefault(spec.section, {})[spec.field] = spec.to_field(value)
    return dataclasses.replace(base, **{
        name: dataclasses.replace(getattr(base, name), **fields)
        for name, fields in changes.items()})

  @classmethod
  def from_flagfile(cls, path: str, **overrides) -> Experiment:
    """The Experiment a `--flagfile` preset describes, with `overrides` by flag name, e.g.
    `Experiment.from_flagfile("flags/quickstart.cfg", train_steps=40, model_dir="/tmp/q")`.

    A preset name ("quickstart") or a path that does not exist but names a preset shipped with the
    package ("flags/quickstart.cfg") reads the packaged file, and so does a run's flags.txt.
    absl parses it exactly as the command line would; the CLI's --mode and absl's own flags
    (--verbosity, --nohelp, ...) are ignored."""
    fv = flags.FlagValues()
    define_flags(fv)
    flagfiles.read_flagfile(fv, path, undefok=("mode", *flagfiles.ABSL_OWN_FLAGS))
    return cls.from_flags({**{name: fv[name].value for name in FLAG_SPECS}, **overrides})

  def flag_values(self) -> dict[str, Any]:
    """{flag name: value} of every flag (the inverse of from_flags)."""
    return {name: spec.to_flag(getattr(getattr(self, spec.section), spec.field))
            for name, spec in FLAG_SPECS.items()}

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
    for old, new in MOVED_FIELDS.items():  # written before the field moved
      (old_section, old_field), (new_section, new_field) = old.split("."), new.split(".")
      if old_field in raw.get(old_section, {}):
        raw.setdefault(new_section, {}).setdefault(new_field, raw[old_section].pop(old_field))
    sections = {}
    for name in SECTIONS:
      section_cls = SECTION_CLASSES[name]
      fields = {f.name for f in dataclasses.fields(section_cls)}
      kwargs = {}
      for key, value in raw.get(name, {}).items():
        if key not in fields:
          raise ConfigError(f"unknown config field {name}.{key}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
      sections[name] = section_cls(**kwargs)
    return cls(**sections)


SECTION_CLASSES: dict[str, Any] = {f.name: type(f.default) for f in dataclasses.fields(Experiment)}
SECTIONS = tuple(SECTION_CLASSES)
SECTION_FIELDS = {name: tuple(f.name for f in dataclasses.fields(cls))
                  for name, cls in SECTION_CLASSES.items()}
FLAG_SPECS = settings.flag_specs(SECTION_CLASSES)
ALIASES = {alias: name for name, spec in FLAG_SPECS.items() for alias in spec.aliases}


def define_flags(fv: flags.FlagValues):
  """Defines every Experiment flag on `fv` (the CLI's FLAGS, or a private FlagValues)."""
  settings.define_flags(FLAG_SPECS, fv)
