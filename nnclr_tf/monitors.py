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
import logging
import os
import time

import keras
import numpy as np

from nnclr_tf import model_dir as md

COLUMNS = ("step", "epoch", "learning_rate", "loss", "nn_label_hit", "contrastive_acc",
           "nn_similarity", "online_probe_acc", "online_probe_loss", "knn_top1")


def _known_header(header):
  """This file's header, or an older one (a subset of today's columns, the step among them)."""
  return bool(header) and "step" in header and set(header) <= set(COLUMNS)


def _first_line(path):
  with open(path, "rb") as f:
    return f.readline()


def append_row(path, row):
  """Appends `row` ({column: value}, the rest left empty) to the CSV at `path`, writing the
  header first. A file written before a column was added gets the current header first (its
  rows rewritten under it, atomically), so no value lands under another column's name. A row
  torn by a kill is cut off; a file whose header is not one of ours (garbled) is kept as
  curves.csv.damaged-<time> and a new one begun; each with one warning line."""
  if os.path.exists(path) and os.path.getsize(path):
    header = next(csv.reader([_first_line(path).decode("utf-8", "replace")]), None)
    if not _known_header(header):
      aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(path, aside)
      logging.warning("%s is damaged (its header is not a curves.csv header); kept as %s, and "
                      "a new one begun", path, aside)
    else:
      _cut_torn_row(path)
      _check_rows_once(path)
      if tuple(header) != COLUMNS:
        _, rows, _ = parse_rows(path)
        with md.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
          w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
          w.writeheader()
          w.writerows({k: r.get(k) or "" for k in COLUMNS} for r in rows)
  elif os.path.exists(path):
    logging.warning("%s was empty (its rows are lost); begun anew", path)
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
      w.writeheader()
    w.writerow({k: row.get(k, "") for k in COLUMNS})


_CHECKED: set = set()


def _check_rows_once(path):
  """Names rows that do not parse (garbled) in one warning line, on a process's first append:
  they are left as they are (the readers leave them out), and the run appends after them."""
  if os.path.abspath(path) in _CHECKED:
    return
  _CHECKED.add(os.path.abspath(path))
  _, _, damage = parse_rows(path)
  if damage:
    logging.warning("%s is damaged (%s); those rows are left as they are, and out of the "
                    "curves", path, damage)


def _cut_torn_row(path):
  """Truncates a last row without its newline (a kill mid-append): the next row would be glued
  to it. Only the writer (the chief's trainer) does this."""
  with open(path, "rb+") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 1))
    if f.read(1) == b"\n":
      return
    f.seek(0)
    keep = f.read().rfind(b"\n") + 1
    f.truncate(keep)
  logging.warning("%s: its last row was torn (by a kill while it was written); cut off", path)


def parse_rows(path):
  """(header, rows, damage): the rows ({column: text}) of the CSV at `path` that parse, and why
  any were left out ("" when none were): a torn last row, rows of another width or with
  non-numbers, or a header that is not one of ours (then no rows)."""
  with open(path, "rb") as f:
    text = f.read().decode("utf-8", "replace")
  lines = text.splitlines(keepends=True)
  damage = []
  if lines and not lines[-1].endswith("\n"):
    lines.pop()
    damage.append("a torn last row")
  reader = csv.reader(lines)
  header = next(reader, None)
  if header is None:
    return None, [], "empty" if not text.strip() else ", ".join(damage)
  if not _known_header(header):
    return header, [], "its header is not a curves.csv header"
  rows, bad = [], 0
  for values in reader:
    try:
      if len(values) > len(header) or not values:
        raise ValueError
      row = dict(zip(header, values))  # a short row leaves its last columns empty
      for v in values:
        if v:
          float(v)
      int(float(row["step"]))
      rows.append(row)
    except ValueError:
      bad += 1
  if bad:
    damage.append(f"{bad} row{'s' * (bad > 1)} that do{'es' * (bad == 1)} not parse")
  return header, rows, ", ".join(damage)


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
  written for the step (a training row and the kNN monitor's row of the same step merge). Rows
  that do not parse are left out, with one warning line."""
  by_step: dict[int, dict] = {}
  _, rows, damage = parse_rows(path)
  if damage:
    md.warn_once(path, f"{path} is damaged ({damage}); those rows are left out of the curves")
  for row in rows:
    merged = by_step.setdefault(int(float(row["step"])), {})
    merged.update({k: v for k, v in row.items() if k in COLUMNS and v not in (None, "")})
  steps = sorted(by_step)
  return {c: np.array([float(by_step[s][c]) if by_step[s].get(c) not in (None, "") else np.nan
                       for s in steps]) for c in COLUMNS}
