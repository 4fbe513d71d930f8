"""Scoring an Experiment's encoder: features through the model_dir's cache, kNN with its
random-init baseline, the labelled splits the supervised protocols need, the plots.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from nnclr_tf import checkpoints, data, evaluation
from nnclr_tf import export as export_lib
from nnclr_tf import model_dir as md
from nnclr_tf import plots as plots_lib
from nnclr_tf.building import build_encoder, eval_data
from nnclr_tf.config import Experiment
from nnclr_tf.errors import DataError
from nnclr_tf.results import KnnFigures


def feature_cache(exp: Experiment, checkpoint):
  """model_dir/features/... of the encoder at `checkpoint` (None: the random-init encoder)."""
  t = exp.train
  extra = None if checkpoint else {"random_init": dataclasses.asdict(exp.model),
                                   "seed": t.seed + 1}
  own = {os.path.abspath(d) for d in (t.model_dir, os.path.join(t.model_dir,
                                                                 checkpoints.MILESTONES))}
  if checkpoint and os.path.dirname(os.path.abspath(checkpoint)) not in own:
    # --checkpoint=<another run's ckpt-N>: its name alone would meet this run's ckpt-N features.
    extra = {"checkpoint": os.path.abspath(checkpoint)}
  return evaluation.feature_cache_path(t.model_dir, checkpoint, exp.data, t.seed, extra)


def eval_features(exp: Experiment, encoder, checkpoint, train, held, use_cache=True):
  """(train_f, train_l, eval_f, eval_l) of `encoder`, through model_dir/features when use_cache
  (the key names `checkpoint`; None with use_cache means the random-init encoder)."""
  size, batch, crop = exp.data.image_size, exp.eval.batch_size, exp.data.eval_crop_fraction
  path = feature_cache(exp, checkpoint) if use_cache else None
  name = ("random-init encoder" if use_cache and not checkpoint else
          f"encoder of {os.path.basename(checkpoint)}" if checkpoint else "trained encoder")
  return evaluation.cached_features(path, encoder, data.eval_dataset(train, size, batch, crop),
                                    data.eval_dataset(held, size, batch, crop), name,
                                    (len(train), len(held)))


def random_init_features(exp: Experiment, train, held):
  """Features of the architecture at random initialisation (seed + 1, local BN), cached: the
  baseline of knn_top1_random_init and linear_top1_random_init."""
  return eval_features(exp, build_encoder(exp), None, train, held)


def num_classes(train, held):
  return len(train.class_names) or int(max(train.labels.max(), held.labels.max())) + 1


def knn_skip_reason(train, held):
  """Why kNN cannot score `held` against the bank `train` ("" when it can)."""
  if held is None or not held.has_labels:
    return "no labelled eval split"
  if not train.has_labels:
    return (f"the kNN bank {train.name} has unlabelled images (--knn_train_split names a "
            "labelled split)")
  labels = getattr(train, "labels", None)  # a streamed split's labels are not in memory
  if labels is not None and len(np.unique(labels)) < 2:
    # One class: every vote is right, a meaningless 100%.
    return (f"the training images have a single class "
            f"({', '.join(train.class_names) or '0'})")
  return ""


def knn_figures(exp: Experiment, encoder, train, held, checkpoint=None) -> KnnFigures:
  """{"knn_top1", "knn_top5"} of `encoder` (weighted kNN, --knn_k and --knn_temperature), held
  against train; through the feature cache when `checkpoint` names what `encoder` holds. The one
  scoring of knn_eval, pretraining's final kNN and the kNN monitor."""
  e = exp.eval
  train_f, train_l, eval_f, eval_l = eval_features(exp, encoder, checkpoint, train, held,
                                                   use_cache=bool(checkpoint))
  return evaluation.knn_eval_features(train_f, train_l, eval_f, eval_l, num_classes(train, held),
                                      e.knn_k, e.knn_temperature)


def knn_results(exp: Experiment, model, train, held, checkpoint=None) -> KnnFigures:
  """kNN of the trained encoder and of the same architecture at random initialisation ({} when
  there is no labelled eval split or a single class).

  With `checkpoint` (the path `model` holds), features come from and go to the cache shared with
  linear_eval and plots (model_dir/features)."""
  reason = knn_skip_reason(train, held)
  if reason:
    # A single class is a warning: the run has labels, but every vote would be right.
    (logging.warning if "single class" in reason else logging.info)("kNN skipped: %s", reason)
    return {}
  e = exp.eval
  classes = num_classes(train, held)
  out = knn_figures(exp, model.encoder, train, held, checkpoint)
  if e.random_init_baseline:
    train_f, train_l, eval_f, eval_l = random_init_features(exp, train, held)
    rand = evaluation.knn_eval_features(train_f, train_l, eval_f, eval_l, classes, e.knn_k,
                                        e.knn_temperature)
    out.update({"knn_top1_random_init": rand["knn_top1"],
                "knn_top5_random_init": rand["knn_top5"]})
  out.update({"knn_k": e.knn_k, "knn_temperature": e.knn_temperature,
              "eval_examples": len(held), "knn_bank_examples": len(train)})
  return out


def labelled_splits(exp: Experiment, mode):
  """(train, held, num_classes) for a supervised evaluation; DataError when labels are missing."""
  train, held = eval_data(exp)
  if not train.has_labels:
    raise DataError(f"--mode={mode} needs labelled training images (class sub-folders, a "
                    "labelled dataset, or --knn_train_split naming its labelled split)")
  if held is None or not held.has_labels:
    raise DataError(f"--mode={mode} needs a labelled eval split: set --val_images=N, "
                    "--eval_split or --eval_image_dir")
  return train, held, num_classes(train, held)


LINEAR_FIGURES = ("protocol", "linear_top1", "linear_top5", "l2", "linear_top1_random_init",
                  "eval_examples", "feature_dim", "epochs")


def classifier_metadata(exp: Experiment, checkpoint, linear):
  """The classifier export's metadata: the encoder's (export_metadata of `checkpoint`, the
  checkpoint the probe was fitted on), the probe's figures and the encoder export of the same
  checkpoint, when there is one."""
  step = checkpoints.checkpoint_step(checkpoint)
  newest, meta = export_lib.newest_export(exp.export.base)
  return md.export_metadata(
      exp.train.model_dir, step, exp.data.image_size, checkpoint=checkpoint,
      encoder_checkpoint=os.path.abspath(checkpoint),
      encoder_export=newest if newest and meta.get("checkpoint_step") == step else None,
      linear_eval={k: linear[k] for k in LINEAR_FIGURES if linear.get(k) is not None})


def write_plots(exp: Experiment, model, train, held, step, checkpoint=None):
  t = exp.train
  # Backbone features from the cache shared with kNN and linear_eval (z is recomputed from them).
  features = None
  if checkpoint and held is not None:
    features = eval_features(exp, model.encoder, checkpoint, train, held)
  return plots_lib.make_plots(model, train, held, exp.data.image_size,
                              md.path(t.model_dir, md.PLOTS),
                              curves_csv=md.path(t.model_dir, md.CURVES),
                              tb_logdir=os.path.join(t.model_dir, md.LOGS, "plots"), step=step,
                              batch_size=exp.eval.batch_size, seed=t.seed,
                              max_tsne_points=exp.plots.tsne_points, features=features,
                              eval_crop_fraction=exp.data.eval_crop_fraction,
                              run_name=run_name(exp))


def run_name(exp: Experiment):
  """The name figures carry: the model_dir's last component."""
  return os.path.basename(os.path.normpath(os.path.abspath(exp.train.model_dir)))
