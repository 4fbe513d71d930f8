import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf.support_set import SupportSet
from oracles import unit as _unit


def test_initialised_with_unit_vectors_and_empty_labels():
  s = SupportSet(64, 8, seed=3)
  q = s.embeddings.numpy()
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
  assert np.all(s.labels.numpy() == -1) and int(s.pointer.numpy()) == 0
  assert np.abs(q.mean()) < 0.2  # not a constant vector


def test_nearest_neighbour_matches_brute_force():
  rng = np.random.default_rng(0)
  s = SupportSet(32, 16)
  s.embeddings.assign(_unit(rng, 32, 16))
  z = _unit(rng, 10, 16)
  nn, idx = s.nearest_neighbour(z)
  q = s.embeddings.numpy()
  brute = np.array([max(range(32), key=lambda j: float(z[i] @ q[j])) for i in range(10)])
  np.testing.assert_array_equal(idx.numpy(), brute)
  np.testing.assert_allclose(nn.numpy(), q[brute])


def test_topk_sampling_returns_only_topk_members():
  rng = np.random.default_rng(1)
  s = SupportSet(64, 8)
  s.embeddings.assign(_unit(rng, 64, 8))
  z = _unit(rng, 6, 8)
  sims = z @ s.embeddings.numpy().T
  top5 = np.argsort(-sims, axis=1)[:, :5]
  seen = set()
  for trial in range(20):
    choice = tf.random.stateless_uniform([6], [trial, 0], 0, 5, dtype=tf.int32)
    _, idx = s.nearest_neighbour(z, k=5, choice=choice)
    for i, j in enumerate(idx.numpy()):
      assert j in top5[i]
      seen.add((i, int(j)))
  assert len(seen) > 6  # it does sample, not always the top-1


def test_fifo_and_wraparound():
  s = SupportSet(8, 2)
  batches = [np.full((4, 2), v, np.float32) for v in (1.0, 2.0, 3.0)]
  for k, b in enumerate(batches):
    s.update(tf.constant(b), tf.fill([4], k))
  q = s.embeddings.numpy()
  # Third batch overwrote the first (oldest) slot range [0, 4); the second stays at [4, 8).
  np.testing.assert_array_equal(q[:4], batches[2])
  np.testing.assert_array_equal(q[4:], batches[1])
  np.testing.assert_array_equal(s.labels.numpy(), [2, 2, 2, 2, 1, 1, 1, 1])
  assert int(s.pointer.numpy()) == 4


def test_refuses_batch_not_dividing_queue():
  s = SupportSet(10, 2)
  with pytest.raises(ValueError, match="multiple"):
    s.update(tf.zeros([4, 2]))


@pytest.mark.parametrize("graph", [False, True])
def test_lookup_reads_state_before_update(graph):
  rng = np.random.default_rng(2)
  s = SupportSet(4, 3)
  old = _unit(rng, 4, 3)
  s.embeddings.assign(old)
  z = _unit(rng, 4, 3)

  def step(z):
    nn, idx = s.nearest_neighbour(z)
    s.update(z)  # writes z itself; a lookup after this would return z (similarity 1)
    return nn, idx

  fn = tf.function(step) if graph else step
  nn, idx = fn(tf.constant(z))
  expected = np.argmax(z @ old.T, axis=1)
  np.testing.assert_array_equal(idx.numpy(), expected)
  np.testing.assert_allclose(nn.numpy(), old[expected])
  np.testing.assert_allclose(s.embeddings.numpy(), z)


def test_checkpoint_round_trip_is_exact(tmp_path):
  rng = np.random.default_rng(3)
  s = SupportSet(16, 4)
  s.update(tf.constant(_unit(rng, 8, 4)), tf.range(8))
  path = tf.train.Checkpoint(s=s).save(str(tmp_path / "ckpt"))
  t = SupportSet(16, 4, seed=99)
  tf.train.Checkpoint(s=t).restore(path).assert_consumed()
  np.testing.assert_array_equal(t.embeddings.numpy(), s.embeddings.numpy())
  np.testing.assert_array_equal(t.labels.numpy(), s.labels.numpy())
  assert int(t.pointer.numpy()) == int(s.pointer.numpy()) == 8
