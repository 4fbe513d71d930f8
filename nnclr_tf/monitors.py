"""Training monitors written next to the TensorBoard logs: a CSV of the curves the plots need.

`CurveLogger` appends one row every `every_steps` optimizer steps and at each epoch end: the global
step, the learning rate, and the running epoch means Keras reports (loss, nn_label_hit,
contrastive_acc, nn_similarity, online_probe_acc, online_probe_loss). A resumed run appends to the
same file; rows of steps re-run after a crash are superseded by the later row of the same step
(`read_curves` keeps the last).
"""

from __future__ import annotations

import csv
import os

import keras
import numpy as np

COLUMNS = ("step", "epoch", "learning_rate", "loss", "nn_label_hit", "contrastive_acc",
           "nn_similarity", "online_probe_acc", "online_probe_loss")


class CurveLogger(keras.callbacks.Callback):

  def __init__(self, path, every_steps=10):
    super().__init__()
    self.path = path
    self.every_steps = max(1, int(every_steps))
    self.last_logs = {}
    self._epoch = 0

  def _write(self, logs):
    opt = self.model.optimizer
    row = {k: float(v) for k, v in (logs or {}).items() if k in COLUMNS}
    row.update(step=int(opt.iterations.numpy()), epoch=self._epoch,
               learning_rate=float(np.asarray(keras.ops.convert_to_numpy(opt.learning_rate))))
    self.last_logs = row
    new = not os.path.exists(self.path)
    with open(self.path, "a", newline="") as f:
      w = csv.DictWriter(f, fieldnames=COLUMNS)
      if new:
        w.writeheader()
      w.writerow({k: row.get(k, "") for k in COLUMNS})

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) % self.every_steps == 0:
      self._write(logs)

  def on_epoch_end(self, epoch, logs=None):
    self._write(logs)


def read_curves(path):
  """{column: float array} ordered by step, one row per step (the last written wins)."""
  by_step = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      by_step[int(float(row["step"]))] = row
  steps = sorted(by_step)
  return {c: np.array([float(by_step[s][c]) if by_step[s].get(c) not in (None, "") else np.nan
                       for s in steps]) for c in COLUMNS}
