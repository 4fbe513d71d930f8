"""curves.csv as the plots read it (the per-step values CurveLogger writes are checked against
Keras's running means in tests/test_operations.py)."""

import numpy as np

from nnclr_tf import monitors


def test_read_curves_orders_by_step_and_the_last_row_of_a_step_wins(tmp_path):
  """A resumed run appends the steps it re-ran after a crash: the later row supersedes."""
  path = tmp_path / "curves.csv"
  header = ",".join(monitors.COLUMNS)
  rows = ["2,0,0.1,5.0,,,,,", "1,0,0.05,6.0,0.1,,,,", "2,0,0.1,4.0,0.2,,,,"]
  path.write_text("\n".join([header, *rows]) + "\n")
  curves = monitors.read_curves(str(path))
  np.testing.assert_array_equal(curves["step"], [1, 2])
  np.testing.assert_array_equal(curves["loss"], [6.0, 4.0])
  np.testing.assert_array_equal(curves["nn_label_hit"], [0.1, 0.2])
  assert np.isnan(curves["online_probe_acc"]).all()
