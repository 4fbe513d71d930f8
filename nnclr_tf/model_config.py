"""NNCLRConfig: everything an NNCLR model is built from, written once.

It is the model's `get_config` payload (with Keras's own name, trainable and dtype) and what
`model_config.json` records of a model_dir. Its defaults are the Experiment's (config.py), but
for the backbone: the Python API starts from the small CNN, the CLI from the paper's ResNet-50.
Free of TensorFlow, so model_dir.py can compare recorded architectures before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nnclr_tf import checks
from nnclr_tf import config as c

_NOT_ARCHITECTURE = {"architecture": False}


@dataclasses.dataclass(frozen=True)
class NNCLRConfig:
  # A name of config.BACKBONES, or a keras.Model from [0, 1] images to feature vectors (get_config
  # records it serialised).
  backbone: Any = "small_cnn"
  image_size: int = c.DataConfig.image_size
  width: int = c.ModelConfig.width
  proj_hidden_dim: int = c.ModelConfig.proj_hidden_dim
  proj_layers: int = c.ModelConfig.proj_layers
  pred_hidden_dim: int = c.ModelConfig.pred_hidden_dim
  embedding_dim: int = c.ModelConfig.embedding_dim
  global_bn: bool = c.ModelConfig.global_bn
  queue_size: int = c.SupportSetConfig.queue_size
  nn_topk: int = c.SupportSetConfig.nn_topk
  use_nn: bool = c.SupportSetConfig.use_nn
  temperature: float = c.LossConfig.temperature
  seed: int = c.TrainConfig.seed
  # A training monitor and preprocessing, not the architecture: evaluation and export build the
  # model without the probe (a resume sizes it from the checkpoint), and a rerun may change the
  # evaluation crop.
  online_probe_classes: int = dataclasses.field(default=0, metadata=_NOT_ARCHITECTURE)
  online_probe_lr: float = dataclasses.field(default=c.ProbeConfig.online_probe_lr,
                                             metadata=_NOT_ARCHITECTURE)
  symmetric_loss: bool = c.LossConfig.symmetric_loss
  eval_crop_fraction: float = dataclasses.field(default=c.DataConfig.eval_crop_fraction,
                                                metadata=_NOT_ARCHITECTURE)
  zero_init_residual: bool = c.ModelConfig.zero_init_residual

  def __post_init__(self):
    checks.check_temperature(self.temperature)
    checks.check_nn_topk(self.nn_topk, self.queue_size)
    checks.check_eval_crop_fraction(self.eval_crop_fraction)
    object.__setattr__(self, "eval_crop_fraction", float(self.eval_crop_fraction))
    object.__setattr__(self, "zero_init_residual", bool(self.zero_init_residual))
    object.__setattr__(self, "symmetric_loss", bool(self.symmetric_loss))

  def to_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = tuple(f.name for f in dataclasses.fields(NNCLRConfig))
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(NNCLRConfig)
                     if f.metadata.get("architecture", True))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(NNCLRConfig)}


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
  """(NNCLRConfig fields, the rest: keras.Model's own name, trainable, dtype) of `kwargs`."""
  return ({k: v for k, v in kwargs.items() if k in FIELDS},
          {k: v for k, v in kwargs.items() if k not in FIELDS})


def architecture(model_config: dict) -> dict:
  """The model config as recorded and compared: NNCLRConfig's architecture fields (those a
  model_config.json written before a field existed lacks mean its default) and Keras's own keys
  (name, trainable, dtype)."""
  out = {k: v for k, v in model_config.items() if k in ARCHITECTURE or k not in FIELDS}
  for name in ARCHITECTURE:
    if name not in out and isinstance(DEFAULTS[name], (bool, int, float, str)):
      out[name] = DEFAULTS[name]
  return out
