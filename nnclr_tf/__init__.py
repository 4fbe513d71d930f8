"""nnclr_tf: NNCLR (Dwibedi et al., ICCV 2021) in TensorFlow 2 / Keras 3.

  from nnclr_tf import Experiment, experiment
  exp = Experiment.from_flagfile("quickstart", model_dir="/tmp/q", train_steps=40)
  results = experiment.pretrain(exp)
"""

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
from nnclr_tf.lars import LARS  # noqa: E402
from nnclr_tf.losses import nnclr_loss  # noqa: E402
from nnclr_tf.model import NNCLR  # noqa: E402
from nnclr_tf.schedules import WarmupCosine  # noqa: E402
from nnclr_tf.support_set import SupportSet  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "AugmentConfig", "ConfigError", "DataConfig", "DataError", "EvalConfig", "Experiment",
    "ExportConfig", "ExportError", "FinetuneConfig", "LARS", "ModelConfig", "ModelDirError",
    "NNCLR", "NNCLRError", "NonFiniteLossError", "OptimConfig", "PlotsConfig", "ProbeConfig",
    "RuntimeConfig", "SupportSetConfig", "TrainConfig", "TrainingError", "SupportSet",
    "WarmupCosine", "errors", "nnclr_loss",
]
