"""The optimizer a config names, over the run's schedule, and the compile rules (the fit loop
itself: tests/test_model.py, tests/test_reliability.py, tests/test_operations.py)."""

import math

import keras
import pytest
import tensorflow as tf

from conftest import mirrored
from nnclr_tf import training
from nnclr_tf.config import OptimConfig
from nnclr_tf.errors import ConfigError
from nnclr_tf.lars import LARS
from nnclr_tf.sgd import CoupledSGD


def test_the_schedule_peaks_at_the_scaled_rate_after_the_warmup():
  """0.3 x 512/256 = 0.6 at the end of 2 epochs of 10 steps, cosine to 0 at step 100."""
  v = [tf.Variable(1.0)]
  opt = training.build_optimizer(OptimConfig(learning_rate=0.3, warmup_epochs=2), v, 512, 100,
                                 10)
  assert isinstance(opt, LARS)
  sched = opt._learning_rate  # the schedule object Keras keeps
  assert float(sched(10)) == pytest.approx(0.3)
  assert float(sched(20)) == pytest.approx(0.6)
  assert float(sched(60)) == pytest.approx(0.6 * 0.5 * (1 + math.cos(math.pi * 40 / 80)))
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


def test_each_optimizer_and_decay_mode():
  v = [tf.Variable(1.0)]
  build = lambda **kw: training.build_optimizer(OptimConfig(**kw), v, 256, 10, 5)
  assert isinstance(build(optimizer="sgd", weight_decay_mode="coupled"), CoupledSGD)
  assert isinstance(build(optimizer="sgd"), keras.optimizers.SGD)
  assert isinstance(build(optimizer="adamw"), keras.optimizers.AdamW)


def test_jit_compile_is_refused_across_mirrored_replicas():
  assert training.keras_jit_compile(True, tf.distribute.get_strategy()) is True
  with pytest.raises(ConfigError, match="--jit_compile with 2 replicas"):
    training.keras_jit_compile(True, mirrored(2))
