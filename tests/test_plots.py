import os

import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import monitors, plots


def decode(path):
  assert os.path.getsize(path) > 1000
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  return tf.io.decode_png(tf.io.read_file(path), channels=3).numpy()


def test_retrieval_grid_size_and_border_colours(tmp_path):
  rng = np.random.default_rng(0)
  queries = rng.uniform(size=(3, 16, 16, 3))
  neighbours = rng.uniform(size=(3, 4, 16, 16, 3))
  q_labels = np.arange(3)
  n_labels = np.tile(np.arange(3)[:, None], (1, 4))
  n_labels[:, 1] = (q_labels + 1) % 3          # column 2 never matches
  n_labels[0, 2] = -1                          # unknown label: grey
  path = plots.retrieval_grid(queries, q_labels, neighbours, n_labels,
                              str(tmp_path / "plots" / "retrieval_grid.png"))
  image = decode(path)
  height, width = plots.retrieval_grid_size(3, 4)
  assert image.shape == (height, width, 3) == (3 * 96 + 36, 5 * 96 + 24, 3)
  assert plots.retrieval_grid_size(8, 8) == (8 * 96 + 36, 9 * 96 + 24)

  def border(row, col):  # a pixel on the left spine of a neighbour cell, half-way down
    x = col * 96 + 24 + 6
    y = 36 + row * 96 + 6 + 14 + (96 - 12 - 14) // 2
    return image[y, x].astype(int)

  def near(pixel, hex_colour):
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(pixel - want).max() <= 40

  for row in range(3):
    assert near(border(row, 1), plots.GREEN), row
    assert near(border(row, 2), plots.RED), row
  assert near(border(0, 3), plots.GREY)


def test_embedding_map_and_curves_sizes(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 120)
  features = rng.normal(size=(120, 16)) + 3 * np.eye(16)[labels]
  path = plots.embedding_map(features, labels, str(tmp_path / "embedding_map.png"),
                             ["a", "b", "c", "d"], max_points=100)
  assert decode(path).shape == (800, 800, 3)
  csv = str(tmp_path / "curves.csv")
  with open(csv, "w") as f:
    f.write(",".join(monitors.COLUMNS) + "\n")
    for s in range(1, 21):
      f.write(f"{s},{s // 10},{0.1 * s},{5 - s / 10},{s / 40},,0.5,{s / 30},\n")
    f.write("20,1,2.0,0.5,0.5,,0.5,0.6,\n")      # a re-run of step 20 supersedes the first
  curves = monitors.read_curves(csv)
  assert len(curves["step"]) == 20 and curves["loss"][-1] == pytest.approx(0.5)
  assert np.isnan(curves["contrastive_acc"]).all()
  path = plots.training_curves(curves, str(tmp_path / "training_curves.png"))
  assert decode(path).shape == (700, 1000, 3)


def test_nearest_and_query_choice():
  rng = np.random.default_rng(2)
  support = rng.normal(size=(50, 8))
  support /= np.linalg.norm(support, axis=1, keepdims=True)
  got = plots.nearest(support[:5].copy(), support, 3, exclude=np.arange(5))
  for i in range(5):  # brute force, the query itself excluded
    order = [j for j in np.argsort(-(support @ support[i])) if j != i]
    np.testing.assert_array_equal(got[i], order[:3])
  labels = np.repeat(np.arange(10), 7)
  q = plots.pick_queries(labels, 8, seed=0)
  assert len(set(labels[q])) == 8
  np.testing.assert_array_equal(q, plots.pick_queries(labels, 8, seed=0))


def test_tensorboard_images(tmp_path):
  path = plots.training_curves({"step": np.arange(3), "loss": np.ones(3)},
                               str(tmp_path / "c.png"))
  plots.write_to_tensorboard({"training_curves": path}, str(tmp_path / "tb"), step=7)
  events = [os.path.join(tmp_path / "tb", f) for f in os.listdir(tmp_path / "tb")]
  tags = [(v.tag, e.step) for e in tf.compat.v1.train.summary_iterator(events[0])
          for v in e.summary.value]
  assert ("training_curves", 7) in tags
