"""curves.csv as the plots read it (the per-step values CurveLogger writes are checked against
Keras's running means in tests/test_operations.py)."""

import os

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


def test_a_knn_row_merges_with_the_training_row_of_its_step(tmp_path):
  path = str(tmp_path / "curves.csv")
  monitors.append_row(path, {"step": 4, "loss": 3.5, "nn_label_hit": 0.25})
  monitors.append_row(path, {"step": 4, "knn_top1": 0.625})
  monitors.append_row(path, {"step": 8, "loss": 3.0})
  curves = monitors.read_curves(path)
  np.testing.assert_array_equal(curves["step"], [4, 8])
  np.testing.assert_array_equal(curves["loss"], [3.5, 3.0])
  assert curves["knn_top1"][0] == 0.625 and np.isnan(curves["knn_top1"][1])
  assert curves["nn_label_hit"][0] == 0.25


def test_a_file_of_an_older_header_gets_the_new_column_without_shifting_values(tmp_path):
  """curves.csv written before knn_top1 existed: appending a kNN point rewrites it under the
  current header first, so the old rows keep their values and the point lands in its column."""
  path = tmp_path / "curves.csv"
  old = [c for c in monitors.COLUMNS if c != "knn_top1"]
  path.write_text(",".join(old) + "\n" + "2,0,0.1,5.0,0.5,,,0.75,\n")
  monitors.append_row(str(path), {"step": 2, "knn_top1": 0.4})
  assert path.read_text().splitlines()[0] == ",".join(monitors.COLUMNS)
  curves = monitors.read_curves(str(path))
  assert curves["loss"][0] == 5.0 and curves["nn_label_hit"][0] == 0.5
  assert curves["online_probe_acc"][0] == 0.75 and curves["knn_top1"][0] == 0.4


def _curves(path, rows):
  path.write_text("\n".join([",".join(monitors.COLUMNS), *rows]) + "\n")


def test_a_torn_last_row_is_cut_before_the_next_append(tmp_path, caplog):
  path = tmp_path / "curves.csv"
  _curves(path, ["1,0,0.1,5.0,,,,,,"])
  with open(path, "a") as f:
    f.write("2,0,0.1,4.")  # a kill mid-append
  assert monitors.parse_rows(str(path))[2] == "a torn last row"
  monitors.append_row(str(path), {"step": 3, "loss": 3.0})
  np.testing.assert_array_equal(monitors.read_curves(str(path))["step"], [1, 3])
  assert [r.getMessage() for r in caplog.records] == [
      f"{path}: its last row was torn (by a kill while it was written); cut off"]


def test_garbled_rows_are_left_out_and_a_garbled_header_is_set_aside(tmp_path, caplog):
  path = tmp_path / "curves.csv"
  _curves(path, ["1,0,0.1,5.0,,,,,,", "2,0,\x00\x17zz,4.0,,,,,,", "3,0,0.1,3.0,,,,,,,,,,"])
  np.testing.assert_array_equal(monitors.read_curves(str(path))["step"], [1])
  assert "2 rows that do not parse" in caplog.records[-1].getMessage()
  path.write_bytes(b"st\xffp,epo\x00h\n1,0\n")
  monitors.append_row(str(path), {"step": 4, "loss": 2.0})
  aside = [p for p in os.listdir(tmp_path) if p.startswith("curves.csv.damaged-")]
  assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == b"st\xffp,epo\x00h\n1,0\n"
  np.testing.assert_array_equal(monitors.read_curves(str(path))["loss"], [2.0])
