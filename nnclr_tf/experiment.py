"""pretrain / knn_eval / linear_eval / finetune / plots / export as functions of one Experiment.

The CLI, notebooks, benchmarks and tests call these; none reads flags. Each returns its results
dict and (on the chief) writes it into the model_dir (`nnclr_tf.model_dir` has the layout):

  exp = Experiment.from_flagfile("flags/quickstart.cfg", model_dir="/tmp/q", train_steps=40)
  strategy = experiment.setup(exp)          # once per process, before other TensorFlow work
  experiment.pretrain(exp, strategy)        # train, export the encoder, kNN, plots
  experiment.linear_eval(exp, strategy)     # probe on frozen features, classifier export

`strategy` may be omitted (setup(exp) is then called on first use).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import (
  checkpoints,
  config,
  data,
  distributed,
  evaluation,
  linear_probe,
  model_config,
  monitors,
  progress,
  training,
)
from nnclr_tf import export as export_lib
from nnclr_tf import finetune as finetune_lib
from nnclr_tf import model_dir as md
from nnclr_tf import plots as plots_lib
from nnclr_tf.backbones import build_backbone
from nnclr_tf.checks import check_batch
from nnclr_tf.config import SECTIONS, Experiment
from nnclr_tf.errors import ConfigError, DataError, ModelDirError
from nnclr_tf.model import NNCLR
from nnclr_tf.model_config import NNCLRConfig

_STRATEGIES = {}


def _locked(mode):
  """Runs the mode holding model_dir/run.lock (model_dir.RunLock; re-entrant, chief only)."""

  def wrap(fn):
    @functools.wraps(fn)
    def run(exp, *args, **kwargs):
      with md.lock(exp.train.model_dir, mode):
        return fn(exp, *args, **kwargs)
    return run
  return wrap


def quiet_tensorflow():
  """TensorFlow's Python logger at ERROR: its warnings repeat what our own lines say."""
  tf.get_logger().setLevel("ERROR")


def setup(exp: Experiment):
  """Runtime set-up: logical CPU devices (before TensorFlow initialises them), op determinism,
  mixed precision; returns the distribution strategy. One strategy per (kind, devices) and
  process: TF's collectives cannot have two over the same devices."""

  r = exp.runtime
  distributed.split_cpu(r.cpu_replicas)
  if r.deterministic:
    tf.config.experimental.enable_op_determinism()
  if r.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
        {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[r.mixed_precision])
  key = (r.strategy, r.cpu_replicas, r.tpu)
  if key not in _STRATEGIES:
    _STRATEGIES[key] = distributed.make_strategy(r.strategy, r.cpu_replicas, r.tpu)
  strategy = _STRATEGIES[key]
  logging.info("strategy %s with %d replicas", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def _strategy(exp, strategy):
  return strategy if strategy is not None else setup(exp)


def nnclr_config(exp: Experiment, online_probe_classes=0) -> NNCLRConfig:
  """The NNCLRConfig of the experiment's model: each field from the one section holding a field
  of its name (a new architecture setting needs no line here)."""
  values = {"online_probe_classes": online_probe_classes}
  for name in MODEL_FIELD_SECTIONS:
    values[name] = getattr(getattr(exp, MODEL_FIELD_SECTIONS[name]), name)
  return NNCLRConfig(**values)


def _model_field_sections():
  out = {}
  for name in model_config.FIELDS:
    if name == "online_probe_classes":  # from the data, not the flags
      continue
    (section,) = [s for s in SECTIONS if name in config.SECTION_FIELDS[s]]
    out[name] = section
  return out


MODEL_FIELD_SECTIONS = _model_field_sections()


def build_model(exp: Experiment, strategy=None, online_probe_classes=0):
  """The NNCLR model the experiment describes, built in the strategy's scope. With
  build_encoder, the only place an Experiment becomes a model."""
  strategy = _strategy(exp, strategy)
  keras.utils.set_random_seed(exp.train.seed)
  with strategy.scope():
    return NNCLR(nnclr_config(exp, online_probe_classes))


def build_encoder(exp: Experiment, seed=None):
  """The experiment's backbone alone, randomly initialised from `seed` (default: the run's seed
  + 1, the random-init baselines' encoder) with local BatchNorm."""
  m, size = exp.model, exp.data.image_size
  keras.utils.set_random_seed(exp.train.seed + 1 if seed is None else seed)
  return build_backbone(m.backbone, (size, size, 3), False, m.width, m.zero_init_residual)


def restored_model(exp: Experiment, strategy=None):
  """(model, checkpoint path) of the latest checkpoint in the model_dir."""
  latest = checkpoints.require_checkpoint(exp.train.model_dir)
  model = build_model(exp, strategy)
  checkpoints.restore(model, latest)
  return model, latest


def load_data(exp: Experiment):
  """(train, held-out) sources of the experiment (held-out may be None)."""
  return data.load_sources(exp.data, exp.train.seed)


def eval_data(exp: Experiment):
  """(bank, held-out) of the evaluations: the bank is --knn_train_split when set (the labelled
  part of a partly unlabelled training set), else the training source."""
  train, held = load_data(exp)
  return data.knn_bank_source(exp.data, train), held


# --- pretrain ----------------------------------------------------------------------------------

@_locked("pretrain")
def pretrain(exp: Experiment, strategy=None, flags_text: str | None = None) -> dict[str, Any]:
  """Trains (resuming from the model_dir), then on the chief exports the encoder, runs kNN of
  the final checkpoint and writes the plots. A model_dir whose run is complete is left as it is;
  parts missing after a crash (export, kNN, plots) run alone. `flags_text` goes to flags.txt
  (default: the experiment as JSON)."""
  strategy = _strategy(exp, strategy)
  t = exp.train
  # Before the data loads (minutes on a large set); training.pretrain checks again for the
  # callers that build their own model and skip the Experiment.
  check_batch(t.batch_size, exp.support.queue_size, strategy.num_replicas_in_sync,
                          exp.support.nn_topk)
  done = finished_pretraining(t, exp.plots.enabled)
  if done:
    print(done)
    return md.read_results(t.model_dir, "pretrain")
  recorded = md.read_results(t.model_dir, "pretrain")
  # The online probe's size comes from the data, so the data is loaded before the model is built.
  train, held = load_data(exp)
  logging.info("training on %d images (%s), %d held out, %d unreadable skipped", len(train),
               train.name, 0 if held is None else len(held), train.skipped)
  model = build_model(exp, strategy, online_probe_classes(exp, train, strategy))
  chief = distributed.is_chief(strategy)
  if chief:
    prepare_model_dir(t.model_dir, model)
    md.write_flags(t.model_dir, flags_text if flags_text is not None else exp.to_json())
  total = t.train_steps or t.train_epochs * data.steps_per_epoch(len(train), t.batch_size)
  if recorded.get("steps") and total > recorded["steps"]:
    logging.warning("%s finished pretraining at step %d; continuing to step %d: the warm-up + "
                    "cosine learning-rate schedule is recomputed for %d steps, so the rate "
                    "jumps back up at step %d", t.model_dir, recorded["steps"], total, total,
                    recorded["steps"])
  curves = curve_logger(exp, train, strategy)
  if chief:
    log_view_pairs(exp, train, os.path.join(t.model_dir, md.LOGS, "views"),
                   checkpoints.checkpoint_step(checkpoints.latest_checkpoint(t.model_dir)))
  results = training.pretrain(model, strategy, train, exp.data, exp.augment, t, exp.optim,
                              callbacks=[curves])
  results["online_probe_acc"] = curves.last_logs.get("online_probe_acc")
  if not chief:
    return results
  step = results["steps"]
  same_step = recorded.get("steps") == step
  final = checkpoints.checkpoint_at(t.model_dir, step)
  bank = data.knn_bank_source(exp.data, train)  # --knn_train_split, else the training images
  # kNN and plots before the export, so that the export's metadata carries the kNN figures.
  if not (same_step and md.evaluated(recorded)):
    results.update(knn_results(exp, model, bank, held, final) or {"knn_skipped": True})
  if exp.plots.enabled and not (same_step and md.plots_exist(recorded)):
    results["plots"] = write_plots(exp, model, bank, held, step, final)
  results.update(train_examples=len(train), skipped_images=train.skipped,
                 skipped_eval_images=0 if held is None else held.skipped,
                 global_batch=t.batch_size, replicas=strategy.num_replicas_in_sync)
  merged = md.merge_results(recorded, results)
  e = exp.export
  crop = exp.data.eval_crop_fraction
  newest, meta = export_lib.newest_export(e.base)
  if (not e.version and newest and meta.get("checkpoint_step") == step
      and meta.get("eval_crop_fraction", 1.0) == crop):
    export_dir = newest  # this checkpoint is served already, with this preprocessing
  else:
    export_dir = export_lib.export_encoder(
        model, e.base, e.version, e.warmup,
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
  if not step or checkpoints.checkpoint_step(checkpoints.latest_checkpoint(model_dir)) != step:
    return None
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


def log_view_pairs(exp: Experiment, train, logdir, step, pairs=8):
  """TensorBoard image `augmented_view_pairs`: the first `pairs` training pairs of the run's
  first batch as the training pipeline makes them (view1 above view2), at `step`."""

  # A batch of `pairs` only: rows and augmentation seeds follow the stream position, so starting
  # at the position of `step` gives the first pairs of the real batch without augmenting all of it.
  batch = exp.train.batch_size
  pairs = min(pairs, len(train))
  small = batch % pairs == 0
  ds = data.pretrain_dataset(train, exp.augment, exp.data.image_size, pairs if small else batch,
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


# --- features, kNN -----------------------------------------------------------------------------

def feature_cache(exp: Experiment, checkpoint):
  """model_dir/features/... of the encoder at `checkpoint` (None: the random-init encoder)."""
  t = exp.train
  extra = None if checkpoint else {"random_init": dataclasses.asdict(exp.model),
                                   "seed": t.seed + 1}
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


def knn_results(exp: Experiment, model, train, held, checkpoint=None):
  """kNN of the trained encoder and of the same architecture at random initialisation ({} when
  there is no labelled eval split or a single class).

  With `checkpoint` (the path `model` holds), features come from and go to the cache shared with
  linear_eval and plots (model_dir/features)."""
  if held is None or not held.has_labels:
    logging.info("no labelled eval split: kNN skipped")
    return {}
  if not train.has_labels:
    logging.info("the kNN bank %s has unlabelled images: kNN skipped (--knn_train_split names a "
                 "labelled split)", train.name)
    return {}
  if len(set(train.labels.tolist())) < 2:  # one class: every vote is right, a meaningless 100%
    logging.warning("kNN skipped: the training images have a single class (%s)",
                    ", ".join(train.class_names) or "0")
    return {}
  e = exp.eval
  classes = num_classes(train, held)
  out = evaluation.knn_eval_features(
      *eval_features(exp, model.encoder, checkpoint, train, held, use_cache=bool(checkpoint)),
      classes, e.knn_k, e.knn_temperature)
  if e.random_init_baseline:
    rand = evaluation.knn_eval_features(*random_init_features(exp, train, held), classes,
                                        e.knn_k, e.knn_temperature)
    out.update(knn_top1_random_init=rand["knn_top1"], knn_top5_random_init=rand["knn_top5"])
  out.update(knn_k=e.knn_k, knn_temperature=e.knn_temperature, eval_examples=len(held),
             knn_bank_examples=len(train))
  return out


@_locked("knn_eval")
def knn_eval(exp: Experiment, strategy=None) -> dict[str, Any]:
  """Weighted kNN of the latest checkpoint's backbone features, eval split against train split."""
  strategy = _strategy(exp, strategy)
  model, latest = restored_model(exp, strategy)
  train, held = eval_data(exp)
  results = knn_results(exp, model, train, held)  # extracted afresh: checks the restore
  results["checkpoint"] = latest
  if distributed.is_chief(strategy):  # multi-worker: only the chief writes into model_dir
    md.write_results(exp.train.model_dir, "knn_eval", results)
  return results


# --- linear_eval, finetune, plots --------------------------------------------------------------

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


@_locked("linear_eval")
def linear_eval(exp: Experiment, strategy=None) -> dict[str, Any]:
  """Linear probe on frozen features of the latest checkpoint (and of the random-init
  architecture), then the classifier export of the probe."""
  strategy = _strategy(exp, strategy)
  t, size = exp.train, exp.data.image_size
  train, held, classes = labelled_splits(exp, "linear_eval")
  model, latest = restored_model(exp, strategy)
  l2 = list(exp.probe.linear_l2)
  cache = feature_cache(exp, latest)
  train_f, train_l, eval_f, eval_l = eval_features(exp, model.encoder, latest, train, held)
  with progress.timed(f"linear probe on {len(train_l):,} features (l2 from {len(l2)} values)"):
    probe, info = linear_probe.fit_probe(train_f, train_l, classes, train.class_names, size,
                                         l2=l2, seed=t.seed)
  scores = linear_probe.evaluate_probe(probe, eval_f, eval_l)
  probe_path = linear_probe.save_probe(md.path(t.model_dir, md.PROBE_FILE), probe)
  results = {"linear_top1": scores["top1"], "linear_top5": scores["top5"], **info,
             "eval_examples": int(len(eval_l)), "feature_dim": int(train_f.shape[1]),
             "probe": probe_path, "feature_cache": cache, "checkpoint": latest}
  if exp.eval.random_init_baseline:
    rf = random_init_features(exp, train, held)  # the encoder of knn_top1_random_init
    with progress.timed("linear probe on the random-init features"):
      rand, rand_info = linear_probe.fit_probe(rf[0], rf[1], classes, l2=l2, seed=t.seed)
    rand_scores = linear_probe.evaluate_probe(rand, rf[2], rf[3])
    results.update(linear_top1_random_init=rand_scores["top1"],
                   linear_top5_random_init=rand_scores["top5"], l2_random_init=rand_info["l2"])
  ex = exp.export
  results["classifier_export_dir"] = export_lib.export_classifier(
      model, probe_path, ex.base, ex.version, ex.warmup,
      metadata=classifier_metadata(exp, latest, results),
      crop_fraction=exp.data.eval_crop_fraction)
  return md.write_results(t.model_dir, "linear_eval", results)


LINEAR_FIGURES = ("linear_top1", "linear_top5", "l2", "linear_top1_random_init", "eval_examples",
                  "feature_dim")


def classifier_metadata(exp: Experiment, checkpoint, linear):
  """The classifier export's metadata: the encoder's (export_metadata of `checkpoint`, the
  checkpoint the probe was fitted on), the probe's figures and the encoder export of the same
  checkpoint, when there is one."""
  step = checkpoints.checkpoint_step(checkpoint)
  newest, meta = export_lib.newest_export(exp.export.base)
  return md.export_metadata(
      exp.train.model_dir, step, exp.data.image_size,
      encoder_checkpoint=os.path.abspath(checkpoint),
      encoder_export=newest if newest and meta.get("checkpoint_step") == step else None,
      linear_eval={k: linear[k] for k in LINEAR_FIGURES if linear.get(k) is not None})


@_locked("finetune")
def finetune(exp: Experiment, strategy=None) -> dict[str, Any]:
  """Semi-supervised fine-tune of the whole network on a class-balanced labelled fraction (or
  from scratch with finetune.init="random"); every (fraction, init) run is kept in the results."""
  strategy = _strategy(exp, strategy)
  t, f = exp.train, exp.finetune
  train, held, classes = labelled_splits(exp, "finetune")
  if f.init == "random":
    model, latest = build_model(exp, strategy), None
  else:
    model, latest = restored_model(exp, strategy)
  results = finetune_lib.finetune(
      model.encoder, train, held, classes, exp.data.image_size, exp.augment,
      label_fraction=f.label_fraction, epochs=f.epochs, batch_size=f.batch_size,
      learning_rate=f.learning_rate, seed=t.seed, strategy=strategy,
      eval_batch_size=exp.eval.batch_size, verbose=t.verbose,
      eval_crop_fraction=exp.data.eval_crop_fraction)
  results.update(init=f.init, checkpoint=latest)
  # The latest run at the top level; every (fraction, init) run kept under by_label_fraction.
  runs = md.read_results(t.model_dir, "finetune").get("by_label_fraction", {})
  key = f"{f.label_fraction:g}" + ("" if f.init == "pretrained" else "_random_init")
  runs[key] = dict(results)
  md.write_results(t.model_dir, "finetune", {**results, "by_label_fraction": runs})
  return results


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


@_locked("plots")
def plots(exp: Experiment, strategy=None) -> dict[str, Any]:
  """Retrieval grid, embedding map and training curves of the latest checkpoint."""
  strategy = _strategy(exp, strategy)
  model, latest = restored_model(exp, strategy)
  train, held = eval_data(exp)
  step = checkpoints.checkpoint_step(latest)
  return {"plots": write_plots(exp, model, train, held, step, latest), "checkpoint": latest}


# --- export ------------------------------------------------------------------------------------

def check_export_target(exp: Experiment, explicit_base=True):
  """Refuses an unwritable export base or an existing export version before any work."""

  e = exp.export
  if explicit_base:
    try:
      os.makedirs(e.base, exist_ok=True)
      probe = tempfile.mkdtemp(prefix=".write_test-", dir=e.base)
      os.rmdir(probe)
    except OSError as err:
      raise ConfigError(f"--export_base={e.base} is not writable ({err.strerror}); choose "
                        "another") from None
  if not e.version:
    return
  for name in (export_lib.ENCODER, export_lib.CLASSIFIER):
    path = export_lib.version_path(e.base, name, e.version)
    if os.path.exists(path):
      nxt = max(export_lib.next_version(os.path.join(e.base, n))
                for n in (export_lib.ENCODER, export_lib.CLASSIFIER))
      raise ConfigError(f"--export_version={e.version}: {path} already exists and a served "
                        f"version is never overwritten; omit --export_version (next free: {nxt}) "
                        "or choose another --export_base")


@_locked("export")
def export(exp: Experiment, strategy=None) -> dict[str, Any]:
  """Encoder (and, when linear_eval has written its probe, classifier) SavedModels of the latest
  checkpoint, in TF Serving's layout."""
  strategy = _strategy(exp, strategy)
  t, e = exp.train, exp.export
  latest = checkpoints.require_checkpoint(t.model_dir)
  model = build_model(exp, strategy)
  md.prepare(t.model_dir, model.get_config())
  checkpoints.restore(model, latest, strict=True)  # the optimizer is not needed
  meta = md.export_metadata(t.model_dir, checkpoints.checkpoint_step(latest), exp.data.image_size)
  crop = exp.data.eval_crop_fraction
  out = {"encoder": export_lib.export_encoder(model, e.base, e.version, e.warmup, metadata=meta,
                                              crop_fraction=crop)}
  probe = md.path(t.model_dir, md.PROBE_FILE)
  linear = md.read_results(t.model_dir, "linear_eval")
  fitted_on = linear.get("checkpoint")
  if os.path.exists(probe) and fitted_on and checkpoints.checkpoint_step(fitted_on) != \
      checkpoints.checkpoint_step(latest):
    # Its probe reads the features of another checkpoint: serving it on this one would be wrong.
    logging.warning("the linear probe %s was fitted on %s, not the latest %s: classifier not "
                    "exported (run --mode=linear_eval again)", probe,
                    os.path.basename(fitted_on), os.path.basename(latest))
  elif os.path.exists(probe):
    out["classifier"] = export_lib.export_classifier(
        model, probe, e.base, e.version, e.warmup,
        metadata=classifier_metadata(exp, latest, linear), crop_fraction=crop)
  else:
    logging.warning("no linear probe at %s: classifier not exported (run --mode=linear_eval)",
                    probe)
  results = {"checkpoint": latest}
  for name, path in out.items():
    results[f"{name}_export_dir"] = path
    results[f"{name}_export_bytes"] = export_lib.dir_size(path)
  return md.write_results(t.model_dir, "export", results)


MODES = {"pretrain": pretrain, "knn_eval": knn_eval, "linear_eval": linear_eval,
         "finetune": finetune, "plots": plots, "export": export}
EXPORTING_MODES = ("pretrain", "linear_eval", "export")

__all__ = ["setup", "build_model", "restored_model", "pretrain", "knn_eval", "linear_eval",
           "finetune", "plots", "export", "MODES", "ModelDirError"]
