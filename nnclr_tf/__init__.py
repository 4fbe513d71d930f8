"""nnclr_tf: NNCLR (Dwibedi et al., ICCV 2021) in TensorFlow 2 / Keras 3.

  from nnclr_tf import Experiment, experiment
  exp = Experiment.from_flagfile("quickstart", model_dir="/tmp/q", train_steps=40)
  results = experiment.pretrain(exp)
"""

import importlib as _importlib
import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from nnclr_tf import errors  # noqa: E402
from nnclr_tf.config import (  # noqa: E402
  AugmentConfig,
  DataConfig,
  EvalConfig,
  Experiment,
  ExportConfig,
  FinetuneConfig,
  LossConfig,
  ModelConfig,
  OptimConfig,
  PlotsConfig,
  ProbeConfig,
  RuntimeConfig,
  SupportSetConfig,
  TrainConfig,
)
from nnclr_tf.errors import (  # noqa: E402
  ConfigError,
  DataError,
  ExportError,
  ModelDirError,
  NNCLRError,
  NonFiniteLossError,
  TrainingError,
)
from nnclr_tf.model_config import NNCLRConfig  # noqa: E402

# The TensorFlow-backed names load on first use: `import nnclr_tf` (and the CLI, which must take
# the model_dir lock and capture TensorFlow's native start-up lines first) stays light.
_LAZY = {"LARS": "nnclr_tf.lars", "nnclr_loss": "nnclr_tf.losses", "NNCLR": "nnclr_tf.model",
         "WarmupCosine": "nnclr_tf.schedules", "SupportSet": "nnclr_tf.support_set"}


def __getattr__(name):
  if name in _LAZY:
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'nnclr_tf' has no attribute {name!r}")


__version__ = "0.2.0"

__all__ = [
    "AugmentConfig", "ConfigError", "DataConfig", "DataError", "EvalConfig", "Experiment",
    "ExportConfig", "ExportError", "FinetuneConfig", "LARS", "LossConfig", "ModelConfig",
    "ModelDirError", "NNCLR", "NNCLRConfig", "NNCLRError", "NonFiniteLossError", "OptimConfig",
    "PlotsConfig", "ProbeConfig", "RuntimeConfig", "SupportSetConfig", "TrainConfig",
    "TrainingError", "SupportSet", "WarmupCosine", "errors", "nnclr_loss",
]
