"""Training monitors written next to the TensorBoard logs: a CSV of the curves the plots need.

`CurveLogger` appends one row every `every_steps` optimizer steps and at each epoch end: the global
step, the learning rate, and the mean of each metric (loss, nn_label_hit, contrastive_acc,
nn_similarity, online_probe_acc, online_probe_loss) over the steps since the previous row, so a
row with every_steps=1 holds that step's own values. Keras reports running means since the epoch
began, which would draw a staircase resetting every epoch; the step values are recovered from two
consecutive running means m_a (after a batches) and m_b (after b): (b*m_b - a*m_a) / (b - a),
in float64 (float32 rounding of the means leaves an error of about b * 1e-7 relative).
A resumed run appends to the same file; rows of steps re-run after a crash are superseded by the
later row of the same step (`read_curves` keeps the last value of each column). The kNN monitor
(knn_monitor.py) writes its points into the same file, as rows holding the step and knn_top1.
"""

from __future__ import annotations

import csv
import os

import keras
import numpy as np

COLUMNS = ("step", "epoch", "learning_rate", "loss", "nn_label_hit", "contrastive_acc",
           "nn_similarity", "online_probe_acc", "online_probe_loss", "knn_top1")


def append_row(path, row):
  """Appends `row` ({column: value}, the rest left empty) to the CSV at `path`, writing the
  header first. A file written before a column was added gets the current header first (its
  rows rewritten under it, atomically), so no value lands under another column's name."""
  if os.path.exists(path):
    with open(path, newline="") as f:
      header = next(csv.reader(f), None)
    if header is not None and tuple(header) != COLUMNS:
      with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
      tmp = path + ".tmp"
      with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: r.get(k) or "" for k in COLUMNS} for r in rows)
      os.replace(tmp, path)
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
      w.writeheader()
    w.writerow({k: row.get(k, "") for k in COLUMNS})


class CurveLogger(keras.callbacks.Callback):

  def __init__(self, path, every_steps=10):
    super().__init__()
    self.path = path
    self.every_steps = max(1, int(every_steps))
    self.last_logs = {}  # Keras's logs (running epoch means) at the last row
    self._epoch = 0
    self._seen = 0  # batches of this epoch (of this fit call) behind the last row
    self._sums = {}  # running mean x batches at the last row
    self._last_step = None
    self._batches = 0

  @staticmethod
  def _scalars(logs):
    # Under multi-worker training the logs are [1]-shaped (model.py), elsewhere scalars.
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in (logs or {}).items()
            if k in COLUMNS}

  def _write(self, logs, batches):
    opt = self.model.optimizer
    step = int(opt.iterations.numpy())
    if step == self._last_step:
      return
    means = self._scalars(logs)
    self.last_logs = dict(means)
    new = batches - self._seen
    row = {}
    for k, m in means.items():
      total = m * batches
      row[k] = (total - self._sums.get(k, 0.0)) / new if new > 0 else m
      self._sums[k] = total
    self._seen = batches
    self._last_step = step
    row.update(step=step, epoch=self._epoch,
               learning_rate=float(np.asarray(keras.ops.convert_to_numpy(opt.learning_rate))))
    append_row(self.path, row)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self._seen, self._sums, self._batches = 0, {}, 0  # Keras resets its metrics here

  def on_train_batch_end(self, batch, logs=None):
    self._batches = batch + 1  # `batch` is the index of the last batch run in this epoch
    if int(self.model.optimizer.iterations.numpy()) % self.every_steps == 0:
      self._write(logs, self._batches)

  def on_epoch_end(self, epoch, logs=None):
    self._write(logs, self._batches)


def read_curves(path):
  """{column: float array} ordered by step, one row per step: of each column, the last value
  written for the step (a training row and the kNN monitor's row of the same step merge)."""
  by_step: dict[int, dict] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      merged = by_step.setdefault(int(float(row["step"])), {})
      merged.update({k: v for k, v in row.items() if k in COLUMNS and v not in (None, "")})
  steps = sorted(by_step)
  return {c: np.array([float(by_step[s][c]) if by_step[s].get(c) not in (None, "") else np.nan
                       for s in steps]) for c in COLUMNS}
