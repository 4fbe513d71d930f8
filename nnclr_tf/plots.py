"""Pictures of a trained model: retrieval grid, embedding map (t-SNE), training curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, so importing this
module never switches the backend of a user's notebook) and saved as PNG with a fixed pixel size.
`make_plots` renders all three for a model and also writes them to TensorBoard.

The retrieval grid is the picture of what NNCLR learns from: each row is a held-out query followed
by its 8 nearest training images in the L2-normalised projection space z, the space in which the
support set is searched for the positive. A green border means the neighbour has the query's label,
red that it does not (grey: unknown label).
"""

from __future__ import annotations

import io
import os

import matplotlib
import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from nnclr_tf import data, monitors, progress
from nnclr_tf import model_dir as md
from nnclr_tf.evaluation import extract_features

GREEN, RED, GREY = "#2ca02c", "#d62728", "#8c8c8c"


def _figure(width_px, height_px, dpi=100):
  fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=fig.dpi)
  md.write_bytes(path, buf.getvalue())
  return path


def _name(label, class_names):
  if label < 0:
    return "?"
  return str(class_names[label]) if class_names is not None and label < len(class_names) \
      else str(label)


def retrieval_grid_size(num_queries, k, cell_px=96, gap_px=24, title_px=36):
  """(height, width) in pixels of `retrieval_grid`'s PNG."""
  return num_queries * cell_px + title_px, (k + 1) * cell_px + gap_px


def retrieval_grid(queries, query_labels, neighbours, neighbour_labels, path, class_names=None,
                   title="", cell_px=96, gap_px=24, title_px=36):
  """Rows of [query | its k neighbours]; neighbour borders green when the label matches the
  query's, red otherwise, grey when unknown.

  queries [Q, H, W, 3] and neighbours [Q, k, H, W, 3] are images in [0, 1] (or uint8);
  query_labels [Q], neighbour_labels [Q, k] ints (-1 unknown).
  """
  queries, neighbours = np.asarray(queries), np.asarray(neighbours)
  nq, k = neighbours.shape[:2]
  height, width = retrieval_grid_size(nq, k, cell_px, gap_px, title_px)
  fig = _figure(width, height)
  pad, text = 6, 14
  side = cell_px - 2 * pad - text

  def cell(r, c, image, label, colour, caption):
    x = c * cell_px + (gap_px if c > 0 else 0) + pad
    y = height - title_px - (r + 1) * cell_px + pad
    ax = fig.add_axes([x / width, y / height, side / width, side / height])
    ax.imshow(np.clip(image, 0, 255 if image.dtype == np.uint8 else 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_edgecolor(colour)
      spine.set_linewidth(4 if c else 2)
    ax.set_title(caption, fontsize=7, pad=2)

  for r in range(nq):
    q = int(query_labels[r])
    cell(r, 0, queries[r], q, "black", f"query: {_name(q, class_names)}")
    for j in range(k):
      n = int(neighbour_labels[r, j])
      colour = GREY if q < 0 or n < 0 else (GREEN if n == q else RED)
      cell(r, j + 1, neighbours[r, j], n, colour, _name(n, class_names))
  fig.text(0.5, 1 - title_px / 2 / height, title or
           "query | 8 nearest training images in z (green: same label, red: different)",
           ha="center", va="center", fontsize=10)
  return _save(fig, path)


def embedding_map(features, labels, path, class_names=None, max_points=2000, seed=0,
                  size_px=800, title=""):
  """t-SNE (scikit-learn, PCA init) of at most `max_points` L2-normalised features (a seeded
  sample), coloured by label. Returns the path. t-SNE costs ~1 min for 2,000 points on one busy
  core and grows faster than linearly, hence the default of 2,000 (5,000 is the sensible top)."""
  features, labels = np.asarray(features, np.float32), np.asarray(labels)
  if len(features) > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
    features, labels = features[keep], labels[keep]
  x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))

  # One OpenMP thread: on a busy 2-core machine two spinning threads made t-SNE 2-18x slower.
  with threadpool_limits(1), progress.timed(f"t-SNE map of {len(x):,} points"):
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity,
              random_state=seed).fit_transform(x)
  fig = _figure(size_px, size_px)
  ax = fig.add_axes([0.06, 0.06, 0.72, 0.86])
  classes = np.unique(labels)
  cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
  for i, c in enumerate(classes):
    m = labels == c
    ax.scatter(xy[m, 0], xy[m, 1], s=6, color=GREY if c < 0 else cmap(i % cmap.N),
               label=_name(int(c), class_names), alpha=0.8, linewidths=0)
  if len(classes) <= 20:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=3,
              frameon=False)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title or f"t-SNE of {len(x)} backbone features", fontsize=11)
  return _save(fig, path)


CURVE_PANELS = (("loss", ("loss",), "NNCLR loss"),
                ("learning_rate", ("learning_rate",), "learning rate"),
                ("nn_label_hit", ("nn_label_hit", "contrastive_acc"),
                 "NN label-hit / in-batch contrastive top-1"),
                ("accuracy", ("online_probe_acc", "knn_top1"),
                 "online probe top-1 (train batches) / kNN top-1 (eval split)"))


def training_curves(curves, path, width_px=1000, height_px=700, title=""):
  """2x2 panels of `curves` ({"step": [...], "loss": [...], ...}, e.g. monitors.read_curves)
  against the step: loss, learning rate, NN label-hit (+ contrastive top-1), online probe (+ the
kNN monitor's points)."""
  fig = _figure(width_px, height_px)
  if title:
    fig.suptitle(title, fontsize=11)
  axes = fig.subplots(2, 2)
  steps = np.asarray(curves.get("step", []))
  for ax, (_, keys, title) in zip(axes.ravel(), CURVE_PANELS):
    drawn = False
    for key in keys:
      y = np.asarray(curves.get(key, []), np.float64)
      ok = np.isfinite(y) if len(y) == len(steps) else np.zeros(0, bool)
      if ok.any():
        ax.plot(steps[ok], y[ok], marker="." if ok.sum() < 30 else None, label=key)
        drawn = True
    if not drawn:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
              color=GREY)
    elif len(keys) > 1:
      ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  fig.subplots_adjust(hspace=0.35, wspace=0.2, left=0.06, right=0.98, top=0.90 if title else 0.94,
                      bottom=0.08)
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Rendering a model's plots.

def _images(source, idx, size, crop_fraction=1.0):
  """Images of `source` at `idx` (any order, repeats allowed) as float [n, size, size, 3], as
  the encoder saw them (the eval transform)."""
  idx = np.asarray(idx).reshape(-1)
  out = [x for x, _ in data.eval_dataset(source.subset(idx), size, 256,
                                         crop_fraction).as_numpy_iterator()]
  return np.concatenate(out)


def _embeddings(model, source, size, batch_size, crop_fraction=1.0):
  """(backbone features h, L2-normalised projections z) of a source, eval transform."""

  dim = int(model.encoder.output.shape[-1])
  both, labels = extract_features(
      lambda x, training=False: tf.concat(model.embed(x, training=training)[:2], axis=1),
      data.eval_dataset(source, size, batch_size, crop_fraction))
  return both[:, :dim], both[:, dim:], labels


def _project(model, features, batch_size=4096):
  """L2-normalised z = projector(h) of backbone features, in batches."""
  out = [tf.math.l2_normalize(model.projector(features[i:i + batch_size], training=False),
                              axis=-1).numpy() for i in range(0, len(features), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, model.projector.output.shape[-1]))


def pick_queries(labels, n, seed):
  """n seeded query indices, from n different classes when there are that many."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  classes = np.unique(labels[labels >= 0])
  if len(classes) >= n:
    return np.array([rng.choice(np.flatnonzero(labels == c))
                     for c in rng.choice(classes, n, replace=False)])
  return rng.choice(len(labels), min(n, len(labels)), replace=False)


def nearest(query_z, support_z, k, exclude=None):
  """Indices [Q, k] of the k most cosine-similar rows of `support_z` (rows L2-normalised);
  `exclude[i]` (a support index) is never returned for query i (a query drawn from the support)."""
  sims = query_z @ support_z.T
  if exclude is not None:
    sims[np.arange(len(sims)), exclude] = -np.inf
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def make_plots(model, train_source, eval_source, image_size, out_dir, curves_csv=None,
               tb_logdir=None, step=0, batch_size=256, seed=0, num_queries=8, k=8,
               max_tsne_points=2000, features=None, eval_crop_fraction=1.0, run_name=""):
  """Writes retrieval_grid.png, embedding_map.png and (if `curves_csv` exists)
  training_curves.png into `out_dir`, and the same images to TensorBoard under `tb_logdir`.
  Queries come from `eval_source` (or the train source when there is none). `features`:
  optional (train_h, train_labels, eval_h, eval_labels) backbone features already extracted
  (evaluation.cached_features), which saves the pass over the data; they and the images shown
  must come from the eval transform at `eval_crop_fraction`. Every figure's title names
  `run_name` and `step`. Returns {name: path}."""
  same = eval_source is None
  if features is not None and not same:
    train_h, train_y, q_h, q_y = (np.asarray(a) for a in features)
    train_z, q_z = _project(model, train_h), _project(model, q_h)
  else:
    train_h, train_z, train_y = _embeddings(model, train_source, image_size, batch_size,
                                            eval_crop_fraction)
    if same:
      q_h, q_z, q_y = train_h, train_z, train_y
    else:
      q_h, q_z, q_y = _embeddings(model, eval_source, image_size, batch_size,
                                  eval_crop_fraction)
  query_source = train_source if same else eval_source
  run = f"{run_name}, step {step}: " if run_name else f"step {step}: "
  queries = pick_queries(q_y, num_queries, seed)
  k = min(k, len(train_z) - (1 if same else 0))
  nn = nearest(q_z[queries], train_z, k, exclude=queries if same else None)
  names = list(train_source.class_names) or None
  paths = {}
  paths["retrieval_grid"] = retrieval_grid(
      _images(query_source, queries, image_size, eval_crop_fraction),
      q_y[queries], _images(train_source, nn, image_size, eval_crop_fraction).reshape(
          len(queries), k, image_size, image_size, 3),
      train_y[nn], os.path.join(out_dir, "retrieval_grid.png"), names,
      title=f"{run}query | {k} nearest training images in z " +
      ("(green: same label, red: different)" if (q_y >= 0).any() else "(labels unknown)"))
  paths["embedding_map"] = embedding_map(
      q_h, q_y, os.path.join(out_dir, "embedding_map.png"), names, max_tsne_points, seed,
      title=f"{run}t-SNE of {min(len(q_h), max_tsne_points)} backbone features "
            f"({'train' if same else 'held-out'} split)")
  if curves_csv and os.path.exists(curves_csv):
    paths["training_curves"] = training_curves(monitors.read_curves(curves_csv),
                                               os.path.join(out_dir, "training_curves.png"),
                                               title=f"{run}training curves (per-step values)")
  if tb_logdir:
    write_to_tensorboard(paths, tb_logdir, step)
  return paths


def write_to_tensorboard(paths, logdir, step):
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    for name, path in paths.items():
      image = tf.io.decode_png(tf.io.read_file(path), channels=3)
      tf.summary.image(name, image[None], step=step)
  writer.flush()
  writer.close()
