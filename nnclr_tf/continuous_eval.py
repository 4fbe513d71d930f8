"""--mode=continuous_eval: an evaluator beside the trainer, as the TF Model Garden's continuous_eval
mode follows a model_dir with tf.train.checkpoints_iterator.

It takes no lock (model_dir.lock) and writes only its own file, one JSON line per scored
checkpoint appended to model_dir/continuous_eval.jsonl (a single write of one line, so a kill
leaves whole lines), and TensorBoard scalars under logs/continuous_eval. Each time it looks, it
scores the newest intact checkpoint newer than the last one scored (checkpoints superseded while
it was busy are passed over, as checkpoints_iterator does); it stops once the run's last step is
scored, or after --eval_timeout seconds without a new checkpoint. A restarted evaluator goes on
after the last line of the file.
"""

from __future__ import annotations

import json
import logging
import os
import time

import tensorflow as tf

from nnclr_tf import checkpoints, evaluation, linear_probe
from nnclr_tf import model_dir as md
from nnclr_tf.scoring import eval_features

FILE = "continuous_eval.jsonl"


def records(model_dir) -> list[dict]:
  """The lines written so far. A torn last line (a kill mid-write) is left out; so are damaged
  lines, with one warning line (their checkpoints are scored again if still on disk)."""
  file_path = md.path(model_dir, FILE)
  try:
    with open(file_path, "rb") as f:
      lines = f.read().decode("utf-8", "replace").splitlines(keepends=True)
  except OSError:
    return []
  out, bad = [], 0
  if lines and not lines[-1].endswith("\n"):
    lines.pop()  # torn: one write() per line, so only damage or a kill mid-write leaves one
    bad += 1
  if not lines and not bad:
    md.warn_once(file_path, f"{file_path} is empty (damaged?); its checkpoints are scored again")
  for line in lines:
    try:
      r = json.loads(line)
      if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
        raise ValueError
      out.append(r)
    except ValueError:
      bad += bool(line.strip())
  if bad:
    lines_text = f"{bad} line{'s' * (bad > 1)} that do{'es' * (bad == 1)} not parse"
    md.warn_once(file_path, f"{file_path} is damaged ({lines_text}); left out, their "
                            "checkpoints scored again")
  return out


def last_step(model_dir) -> int:
  return max((r["step"] for r in records(model_dir)), default=0)


def append(model_dir, record):
  file_path = md.path(model_dir, FILE)
  line = (json.dumps(record, sort_keys=True) + "\n").encode()
  try:
    with open(file_path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        line = b"\n" + line  # after a line torn by a kill: start a new one
  except OSError:
    pass  # no file yet, or an empty one
  fd = os.open(file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line)  # one write on an O_APPEND descriptor: lines never interleave
  finally:
    os.close(fd)


def next_checkpoint(model_dir, after_step):
  """The newest intact checkpoint of a step above `after_step`, or None."""
  newest = checkpoints.newest_intact(model_dir)
  if newest and checkpoints.checkpoint_step(newest) > after_step:
    return newest
  return None


def run_finished(model_dir, step, target):
  """True when `step` is the run's last: the target the flags give, or the step a finished
  pretraining recorded."""
  if target and step >= target:
    return True
  recorded = md.read_results(model_dir, "pretrain", damaged="warn",
                             consequence="the run's last step is not known from it, so the "
                             "evaluator stops at --eval_timeout or the step the flags give")
  return recorded.get("steps") == step


def score(exp, encoder, train, held, classes, linear):
  """kNN (and, with `linear`, the L-BFGS probe's top-1) of `encoder`, from one feature pass."""
  train_f, train_l, eval_f, eval_l = eval_features(exp, encoder, None, train, held,
                                                   use_cache=False)
  e = exp.eval
  out = evaluation.knn_eval_features(train_f, train_l, eval_f, eval_l, classes, e.knn_k,
                                     e.knn_temperature)
  if linear:
    probe, info = linear_probe.fit_probe(train_f, train_l, classes, train.class_names,
                                         exp.data.image_size, l2=list(exp.probe.linear_l2),
                                         seed=exp.train.seed)
    scores = linear_probe.evaluate_probe(probe, eval_f, eval_l)
    out.update({"linear_top1": scores["top1"], "linear_top5": scores["top5"], "l2": info["l2"]})
  return out


def follow(exp, model, train, held, classes, target):
  """Scores checkpoints as they appear (module docstring); returns the steps scored now and
  whether it stopped for --eval_timeout."""
  t, e = exp.train, exp.eval
  done = last_step(t.model_dir)
  scored = []
  writer = tf.summary.create_file_writer(os.path.join(t.model_dir, md.LOGS, "continuous_eval"))
  waited_since = time.monotonic()
  while not (done and run_finished(t.model_dir, done, target)):
    chosen = next_checkpoint(t.model_dir, done)
    if chosen is None:
      if time.monotonic() - waited_since >= e.eval_timeout:
        logging.warning("--mode=continuous_eval: no new checkpoint in --model_dir=%s for %ds "
                        "(--eval_timeout); stopping after step %d", t.model_dir, e.eval_timeout,
                        done)
        return scored, True
      time.sleep(e.eval_poll_seconds)
      continue
    start = time.monotonic()
    try:
      checkpoints.restore(model, chosen)
    except tf.errors.NotFoundError:
      if tf.io.gfile.exists(chosen + ".index"):
        raise
      continue  # deleted by the trainer (--keep_checkpoints) since it was chosen: look again
    step = checkpoints.checkpoint_step(chosen)
    figures = score(exp, model.encoder, train, held, classes, e.continuous_eval_linear)
    record = {"step": step, "checkpoint": chosen, **figures,
              "seconds": round(time.monotonic() - start, 3), "time": time.time()}
    append(t.model_dir, record)
    with writer.as_default():
      for key in ("knn_top1", "knn_top5", "linear_top1"):
        if key in figures:
          tf.summary.scalar(key, figures[key], step=step)
      writer.flush()
    logging.info("continuous_eval: step %d knn_top1 %.4f", step, figures["knn_top1"])
    scored.append(step)
    done = step
    waited_since = time.monotonic()
  return scored, False
