"""kNN accuracy while pretraining (--knn_every_steps), as lightly's and solo-learn's benchmarks
watch it: weighted kNN of the eval split against the training split (or a class-balanced subset,
--knn_monitor_bank) every N steps and at the run's last step, from the model in inference mode,
scored by the same function as knn_eval (`scoring.knn_figures`), so a point equals knn_eval of
the checkpoint of that step.

Each point goes to curves.csv (column knn_top1 on its step's row), to TensorBoard (logs/knn:
knn_top1, knn_top5) and from there to training_curves.png; one line says it and its seconds,
which the results sum (knn_monitor_seconds). It runs after TimingCallback has timed the step, so
pairs/s does not count it.

Resuming neither repeats nor skips a point. Points recorded at or before the restored step
describe states the checkpoint history holds and are kept; a point missing at the restored step
itself (a kill between that checkpoint and its kNN) is scored at once, from the restored state,
which is that step's; points after the restored step belong to a state the resume discarded and
are scored again on the way (their new rows supersede the old, as the loss rows do).
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import monitors, progress


class KnnMonitor(keras.callbacks.Callback):
  """`score(encoder) -> {"knn_top1", "knn_top5"}` every `every_steps` optimizer steps and at
  `total_steps`; `describe` names the bank and queries in the line each point prints."""

  def __init__(self, score, every_steps, total_steps, curves_path, logdir, describe=""):
    super().__init__()
    self.score = score
    self.every_steps = int(every_steps)
    self.total_steps = int(total_steps)
    self.curves_path = curves_path
    self.logdir = logdir
    self.describe = describe
    self.points: dict[int, dict] = {}  # step -> figures scored by this process
    self.seconds = 0.0
    self._interval = None
    self._writer = None

  def _step(self):
    return int(self.model.optimizer.iterations.numpy())

  def _due(self, step):
    return step == self.total_steps or step % self.every_steps == 0

  def on_train_begin(self, logs=None):
    step = self._step()
    self._interval = step // self.every_steps
    if step and self._due(step) and step not in recorded_steps(self.curves_path):
      self.evaluate(step)

  def on_train_batch_end(self, batch, logs=None):
    if self.model.stop_training:
      # A signal or a non-finite loss stops the run: no minutes of kNN now (a stop at a due
      # step is scored when the run resumes there).
      return
    step = self._step()
    # Intervals, not `step % N`: with steps_per_execution > 1 not every step is seen.
    if step // self.every_steps > self._interval or step == self.total_steps:
      self.evaluate(step)
    self._interval = step // self.every_steps

  def finish(self, model):
    """The last step's point, when the run is there and it is missing (a kill after the last
    checkpoint, before its kNN; a rerun then trains no step)."""
    self.set_model(model)
    step = self._step()
    if step == self.total_steps and step not in self.points and \
        step not in recorded_steps(self.curves_path):
      self.evaluate(step)

  def evaluate(self, step):
    if step in self.points:
      return self.points[step]
    t = time.perf_counter()
    with progress.silenced():
      figures = self.score(self.model.encoder)
    seconds = time.perf_counter() - t
    self.seconds += seconds
    self.points[step] = {**figures, "seconds": seconds}
    monitors.append_row(self.curves_path, {"step": step, "knn_top1": figures["knn_top1"]})
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.logdir)
    with self._writer.as_default():
      for name in ("knn_top1", "knn_top5"):
        tf.summary.scalar(name, figures[name], step=step)
    self._writer.flush()
    # Also on stdout at --verbose 1/2: the curve is what a user watches this for.
    progress.say(f"kNN at step {step}: top-1 {figures['knn_top1']:.4f}, top-5 "
                 f"{figures['knn_top5']:.4f} ({self.describe}{seconds:.1f} s)")
    logging.info("kNN at step %d: %s", step, figures)
    return self.points[step]


def recorded_steps(curves_path):
  """Steps curves.csv holds a knn_top1 for."""
  curves = monitors.read_curves(curves_path) if curves_path and _exists(curves_path) else {}
  knn = curves.get("knn_top1")
  if knn is None:
    return set()
  return {int(s) for s, v in zip(curves["step"], knn) if np.isfinite(v)}


def curve(curves_path):
  """[{"step", "knn_top1"}] of curves.csv, by step."""
  curves = monitors.read_curves(curves_path) if _exists(curves_path) else {}
  knn = curves.get("knn_top1", [])
  return [{"step": int(s), "knn_top1": float(v)} for s, v in zip(curves.get("step", []), knn)
          if np.isfinite(v)]


def _exists(path):
  return bool(path) and tf.io.gfile.exists(path)
