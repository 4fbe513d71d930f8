import math

import pytest

from nnclr_tf.schedules import WarmupCosine, scaled_learning_rate


def test_linear_and_sqrt_scaling():
  assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)  # the paper's value
  assert scaled_learning_rate(0.3, 1024, "sqrt") == pytest.approx(0.6)
  assert scaled_learning_rate(0.3, 1024, "none") == pytest.approx(0.3)
  with pytest.raises(ValueError):
    scaled_learning_rate(0.3, 256, "cubic")


def test_warmup_then_cosine_values():
  s = WarmupCosine(peak=4.8, warmup_steps=100, total_steps=1100)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(50)) == pytest.approx(2.4)
  assert float(s(100)) == pytest.approx(4.8)              # warm-up end: peak
  assert float(s(600)) == pytest.approx(2.4, rel=1e-5)    # half-way through the decay
  assert float(s(350)) == pytest.approx(4.8 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert float(s(1100)) == pytest.approx(0.0, abs=1e-6)   # end
  assert float(s(5000)) == pytest.approx(0.0, abs=1e-6)   # past the end stays at 0


def test_no_warmup():
  s = WarmupCosine(peak=1.0, warmup_steps=0, total_steps=10)
  assert float(s(0)) == pytest.approx(1.0)
  assert float(s(5)) == pytest.approx(0.5, rel=1e-5)


def test_warmup_not_shorter_than_the_run_is_warned(caplog):
  import logging

  import keras

  from nnclr_tf import training
  from nnclr_tf.config import OptimConfig
  v = [keras.Variable([1.0, 2.0])]
  with caplog.at_level(logging.WARNING):
    opt = training.build_optimizer(OptimConfig(warmup_epochs=10.0), v, 256, 20, 4)  # 40 >= 20
  assert "--warmup_epochs=10 is 40 steps, not fewer than the run's 20" in caplog.text
  # The schedule is then a pure ramp over the whole run (warm-up capped at its length).
  sched = keras.saving.deserialize_keras_object(opt.get_config()["learning_rate"])
  assert isinstance(sched, keras.optimizers.schedules.CosineDecay)  # loads without nnclr_tf
  assert sched.warmup_steps == 20
  assert float(sched(19)) == pytest.approx(0.3 * 19 / 20)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    opt = training.build_optimizer(OptimConfig(warmup_epochs=1.0), v, 256, 20, 4)
  assert "warmup_epochs" not in caplog.text
  sched = keras.saving.deserialize_keras_object(opt.get_config()["learning_rate"])
  assert sched.warmup_steps == 4 and float(sched(4)) == pytest.approx(0.3)
