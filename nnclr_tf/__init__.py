"""nnclr_tf: NNCLR (Dwibedi et al., ICCV 2021) in TensorFlow 2 / Keras 3."""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from nnclr_tf.config import (AugmentConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,  # noqa: E402
                             SupportSetConfig, TrainConfig)
from nnclr_tf.lars import LARS  # noqa: E402
from nnclr_tf.losses import nnclr_loss  # noqa: E402
from nnclr_tf.model import NNCLR  # noqa: E402
from nnclr_tf.schedules import WarmupCosine  # noqa: E402
from nnclr_tf.support_set import SupportSet  # noqa: E402

__version__ = "0.1.0"
