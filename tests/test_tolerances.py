"""The cross-kernel comparison itself (tolerances.py): what counts as left untouched by training."""

import numpy as np

import tolerances

KEY = "model/x/.ATTRIBUTES/VARIABLE_VALUE"


def states(v0, va, vb):
  return ({KEY: np.asarray(v0, np.float32)}, {KEY: np.asarray(va, np.float32)},
          {KEY: np.asarray(vb, np.float32)})


def test_an_element_that_trained_back_to_its_start_is_not_untouched():
  rng = np.random.default_rng(0)
  v0 = rng.normal(size=(4, 8)).astype(np.float32)
  va = v0 + rng.normal(scale=1e-3, size=v0.shape).astype(np.float32)
  va[1, 3] = v0[1, 3]  # its updates summed back to the initial float
  vb = va.copy()
  vb[1, 3] += 4e-6  # another kernel's rounding
  assert tolerances.untouched_violations(*states(v0, va, vb)) == []


def test_a_row_training_never_wrote_must_stay_as_it_was():
  v0 = np.ones((4, 8), np.float32)
  va = v0.copy()
  va[:2] += 0.5  # rows 0-1 written (queue rows), rows 2-3 not
  vb = va.copy()
  vb[3, 0] += 0.01
  assert tolerances.untouched_violations(*states(v0, va, vb)) == [KEY]
  vb[3, 0] = va[3, 0]
  assert tolerances.untouched_violations(*states(v0, va, vb)) == []


def test_a_scalar_or_vector_element_is_its_own_row():
  v0 = np.array([0.1, 0.2, 0.3], np.float32)
  va = np.array([0.1, 0.25, 0.3], np.float32)  # elements 0 and 2 untouched
  vb = np.array([0.1, 0.25, 0.31], np.float32)
  assert tolerances.untouched_violations(*states(v0, va, vb)) == [KEY]
