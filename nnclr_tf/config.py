"""Frozen configuration dataclasses.

Library code takes these objects (or explicit arguments); only `run.py` reads absl flags and turns
them into configs, so notebooks and tests build configs directly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"            # digits | folder | numpy | <any tfds image dataset name>
  image_dir: Optional[str] = None     # --dataset=folder
  eval_image_dir: Optional[str] = None
  val_images: int = 0                 # carve a seeded class-balanced held-out set of this size
  data_dir: Optional[str] = None      # tfds data_dir
  train_split: str = "train"
  eval_split: str = "test"
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
  crop_scale: Tuple[float, float] = (0.08, 1.0)
  crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: Tuple[float, float] = (1.0, 0.1)
  solarize_prob: Tuple[float, float] = (0.0, 0.2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = "resnet50"                   # resnet50 | resnet18_cifar | small_cnn
  proj_hidden_dim: int = 2048
  proj_layers: int = 3                         # paper: 3 layers [2048, 2048, 256]
  pred_hidden_dim: int = 4096                  # paper: [4096, 256]
  embedding_dim: int = 256
  global_bn: bool = True                       # synchronised BN across replicas (paper)
  width: int = 64                              # base width of small_cnn / resnet18_cifar


@dataclasses.dataclass(frozen=True)
class SupportSetConfig:
  queue_size: int = 98304
  nn_topk: int = 1
  use_nn: bool = True          # False: the positive is the other view itself (SimCLR ablation)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "lars"      # lars | sgd | adamw
  learning_rate: float = 0.3   # base lr, scaled by global_batch / 256 (see lr_scaling)
  lr_scaling: str = "linear"   # linear | sqrt | none
  weight_decay: float = 1e-6
  momentum: float = 0.9
  lars_eta: float = 0.001
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
