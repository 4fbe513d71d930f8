import numpy as np
import pytest

from nnclr_tf.losses import nnclr_loss
from oracles import nnclr_loss as numpy_loss
from oracles import unit as _unit


def test_matches_numpy_formula():
  rng = np.random.default_rng(0)
  nn, p = _unit(rng, 8, 5), _unit(rng, 8, 5)
  loss, logits, labels = nnclr_loss(nn, p, 0.1)
  assert float(loss) == pytest.approx(numpy_loss(nn, p, 0.1), rel=1e-5)
  np.testing.assert_allclose(logits.numpy(), nn @ p.T / 0.1, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels.numpy(), np.arange(8))


def test_replica_split_with_label_offsets_equals_global_loss():
  # Two replicas each hold 4 rows of nn and see all 8 predictions; labels offset by 4 * replica id.
  rng = np.random.default_rng(1)
  nn, p = _unit(rng, 8, 6), _unit(rng, 8, 6)
  full = numpy_loss(nn, p, 0.2)
  parts = [float(nnclr_loss(nn[r * 4:(r + 1) * 4], p, 0.2, label_offset=r * 4)[0])
           for r in range(2)]
  assert np.mean(parts) == pytest.approx(full, rel=1e-5)
  # Without the offset replica 1 would score against the wrong positives.
  wrong = float(nnclr_loss(nn[4:], p, 0.2, label_offset=0)[0])
  assert wrong != pytest.approx(parts[1], rel=1e-3)


def test_temperature_scales_logits():
  rng = np.random.default_rng(2)
  nn, p = _unit(rng, 4, 3), _unit(rng, 4, 3)
  _, l1, _ = nnclr_loss(nn, p, 1.0)
  _, l2, _ = nnclr_loss(nn, p, 0.5)
  np.testing.assert_allclose(l2.numpy(), 2 * l1.numpy(), rtol=1e-6)
