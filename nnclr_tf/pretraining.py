"""experiment.pretrain's stages: train (resuming), evaluate (kNN, plots) and export, each of which a
rerun skips when the model_dir already holds its output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

from nnclr_tf import checkpoints, data, distributed, knn_monitor, monitors, training
from nnclr_tf import export as export_lib
from nnclr_tf import model_dir as md
from nnclr_tf.building import build_model, load_data
from nnclr_tf.config import Experiment
from nnclr_tf.results import PretrainResults
from nnclr_tf.scoring import knn_figures, knn_results, knn_skip_reason, write_plots


@dataclasses.dataclass
class TrainedRun:
  """What the train stage hands the evaluate and export stages."""
  model: Any
  train: Any            # the training source
  held: Any             # the held-out source, or None
  bank: Any             # the kNN bank: --knn_train_split, else the training source
  results: PretrainResults  # this run's figures so far
  recorded: dict        # pretrain_results.json as the run found it
  chief: bool
  replicas: int


def train(exp: Experiment, strategy, flags_text: str | None = None) -> TrainedRun:
  """Loads the data, builds the model, records the model_dir's config and flags (chief), and
  trains to the target step, resuming from the newest checkpoint."""
  t = exp.train
  recorded = md.read_results(t.model_dir, "pretrain")
  # The online probe's size comes from the data, so the data is loaded before the model is built.
  train_src, held = load_data(exp)
  logging.info("training on %d images (%s), %d held out, %d unreadable skipped", len(train_src),
               train_src.name, 0 if held is None else len(held), train_src.skipped)
  model = build_model(exp, strategy, online_probe_classes(exp, train_src, strategy))
  chief = distributed.is_chief(strategy)
  if chief:
    prepare_model_dir(t.model_dir, model)
    md.write_flags(t.model_dir, flags_text if flags_text is not None else exp.to_json())
  total = t.train_steps or t.train_epochs * data.steps_per_epoch(len(train_src), t.batch_size)
  if recorded.get("steps") and total > recorded["steps"]:
    logging.warning("%s finished pretraining at step %d; continuing to step %d: the warm-up + "
                    "cosine learning-rate schedule is recomputed for %d steps, so the rate "
                    "jumps back up at step %d", t.model_dir, recorded["steps"], total, total,
                    recorded["steps"])
  curves = curve_logger(exp, train_src, strategy)
  bank = data.knn_bank_source(exp.data, train_src)
  monitor = make_knn_monitor(exp, bank, held, strategy, total)
  if chief:
    log_view_pairs(exp, train_src, os.path.join(t.model_dir, md.LOGS, "views"),
                   checkpoints.checkpoint_step(checkpoints.latest_checkpoint(t.model_dir)))
  results: PretrainResults = {
      **training.pretrain(model, strategy, train_src, exp.data, exp.augment, t, exp.optim,
                          callbacks=[curves] + ([monitor] if monitor else [])),
      "online_probe_acc": curves.last_logs.get("online_probe_acc")}
  if monitor:
    monitor.finish(model)
    results["knn_monitor_seconds"] = monitor.seconds
    results["knn_curve"] = knn_monitor.curve(monitor.curves_path)
  return TrainedRun(model, train_src, held, bank, results, recorded, chief,
                    strategy.num_replicas_in_sync)


def evaluate(exp: Experiment, run: TrainedRun):
  """kNN and plots of the final checkpoint, unless the model_dir has them for this step. Before
  the export, so that the export's metadata carries the kNN figures."""
  step, recorded, results = run.results["steps"], run.recorded, run.results
  same_step = recorded.get("steps") == step
  final = checkpoints.checkpoint_at(exp.train.model_dir, step)
  bank = run.bank
  if not (same_step and md.evaluated(recorded)):
    figures = knn_results(exp, run.model, bank, run.held, final)
    if figures:
      results.update(figures)
    else:
      results["knn_skipped"] = True
  if exp.plots.enabled and not (same_step and md.plots_exist(recorded)):
    results["plots"] = write_plots(exp, run.model, bank, run.held, step, final)
  results.update({"train_examples": len(run.train), "skipped_images": run.train.skipped,
                  "skipped_eval_images": 0 if run.held is None else run.held.skipped,
                  "global_batch": exp.train.batch_size, "replicas": run.replicas})


def export(exp: Experiment, run: TrainedRun) -> PretrainResults:
  """The encoder export of the final checkpoint (reused when it is served already with this
  preprocessing), then pretrain_results.json: this run's figures over the recorded ones."""
  t, e, step = exp.train, exp.export, run.results["steps"]
  merged: PretrainResults = md.merge_results(run.recorded, run.results)
  crop = exp.data.eval_crop_fraction
  newest, meta = export_lib.newest_export(e.base)
  if (not e.version and newest and meta.get("checkpoint_step") == step
      and meta.get("eval_crop_fraction", 1.0) == crop):
    export_dir = newest  # this checkpoint is served already, with this preprocessing
  else:
    export_dir = export_lib.export_encoder(
        run.model, e.base, e.version, e.warmup,
        metadata=md.export_metadata(t.model_dir, step, exp.data.image_size, merged),
        crop_fraction=crop)
  merged["export_dir"] = export_dir
  return md.write_results(t.model_dir, "pretrain", merged)


def finished_pretraining(train_cfg, plots_enabled):
  """A one-line summary when model_dir's pretraining reached its last step and its kNN, plots and
  encoder export exist (a rerun then has nothing to do), else None."""
  model_dir = train_cfg.model_dir
  recorded = md.read_results(model_dir, "pretrain")
  step = recorded.get("steps")
  latest = checkpoints.latest_checkpoint(model_dir)
  if not step or checkpoints.checkpoint_step(latest) != step or checkpoints.damage(latest):
    return None  # a damaged final checkpoint: the run resumes from the newest intact one
  if md.target_steps(train_cfg, recorded) != step or not md.evaluated(recorded):
    return None
  if plots_enabled and not md.plots_exist(recorded):
    return None
  export_dir = recorded.get("export_dir")
  if not export_dir or export_lib.read_metadata(export_dir).get("checkpoint_step") != step:
    return None
  return (f"{model_dir}: pretraining finished at step {step}; results in "
          f"{md.results_path(model_dir, 'pretrain')}, encoder export {export_dir}; nothing to do "
          "(raise --train_steps or --train_epochs to train longer)")


def prepare_model_dir(model_dir, model):
  """md.prepare, after checking that a checkpoint written without model_config.json (by the
  Python API) fits `model`: only then may its config be recorded."""
  checked = False
  if not os.path.exists(md.path(model_dir, md.MODEL_CONFIG)) and md.has_checkpoint(model_dir):
    checkpoints.check_checkpoint_fits(model, model_dir)
    checked = True
  md.prepare(model_dir, model.get_config(), checkpoint_checked=checked)


def online_probe_classes(exp: Experiment, train, strategy):
  """Classes of the online probe; 0 (off) without probe.online_probe or without labels.

  A resumed run keeps what its checkpoint holds (a probe of its size, or none), so that turning
  the probe on for a model_dir pretrained without it, or a different label count, never breaks
  the restore; a new run sizes the probe from the training labels."""

  if not exp.probe.online_probe:
    return 0
  in_checkpoint = checkpoints.online_probe_classes(
      distributed.worker_dir(exp.train.model_dir, strategy))
  if in_checkpoint is not None:
    return in_checkpoint
  labels = getattr(train, "labels", None)
  if labels is None:  # a streamed tfds split
    return len(train.class_names) if train.has_labels else 0
  labels = np.asarray(labels)
  if not (labels >= 0).any():
    return 0
  return max(len(train.class_names), int(labels.max()) + 1)


def curve_logger(exp: Experiment, train, strategy):
  """Rows of per-step values; about 50 per epoch (each the mean over the steps since the previous
  row; a row per step when an epoch has 50 steps or fewer)."""
  t = exp.train
  spe = max(1, data.steps_per_epoch(len(train), t.batch_size))
  return monitors.CurveLogger(os.path.join(distributed.worker_dir(t.model_dir, strategy),
                                           md.CURVES), max(1, spe // 50))


def make_knn_monitor(exp: Experiment, bank, held, strategy, total_steps):
  """The KnnMonitor of --knn_every_steps (None when off, or with nothing to score: one warning
  says why)."""
  e = exp.eval
  if not e.knn_every_steps:
    return None
  reason = knn_skip_reason(bank, held)
  if reason:
    logging.warning("--knn_every_steps=%d: no kNN while pretraining: %s", e.knn_every_steps,
                    reason)
    return None
  bank = data.bank_subset(bank, e.knn_monitor_bank, exp.train.seed)
  out_dir = distributed.worker_dir(exp.train.model_dir, strategy)
  return knn_monitor.KnnMonitor(
      lambda encoder: knn_figures(exp, encoder, bank, held), e.knn_every_steps, total_steps,
      os.path.join(out_dir, md.CURVES), os.path.join(out_dir, md.LOGS, "knn"),
      describe=f"{len(bank):,} bank images, {len(held):,} queries, ")


def log_view_pairs(exp: Experiment, train, logdir, step, pairs=8):
  """TensorBoard image `augmented_view_pairs`: the first `pairs` training pairs of the run's
  first batch as the training pipeline makes them (view1 above view2), at `step`."""

  # A batch of `pairs` only: rows and augmentation seeds follow the stream position, so starting
  # at the position of `step` gives the first pairs of the real batch without augmenting all of it.
  batch = exp.train.batch_size
  pairs = min(pairs, len(train))
  small = batch % pairs == 0
  # Coloured on the host whatever --augment_on says: the same views, as images.
  host = dataclasses.replace(exp.augment, augment_on="host")
  ds = data.pretrain_dataset(train, host, exp.data.image_size, pairs if small else batch,
                             exp.train.seed, step * batch // pairs if small else step)
  first = next(iter(ds.take(1)))
  n = min(pairs, int(first["view1"].shape[0]))
  rows = [np.concatenate(list(first[v][:n].numpy()), axis=1) for v in ("view1", "view2")]
  grid = np.clip(np.concatenate(rows, axis=0), 0, 1)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    tf.summary.image("augmented_view_pairs", grid[None], step=step,
                     description="top: view1, bottom: view2 of the same images")
  writer.close()
