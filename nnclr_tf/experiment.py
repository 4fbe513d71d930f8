"""pretrain / knn_eval / linear_eval / finetune / plots / export / continuous_eval as functions of
one Experiment.

The CLI, notebooks, benchmarks and tests call these; none reads flags. Each returns its results
dict and (on the chief) writes it into the model_dir (`nnclr_tf.model_dir` has the layout):

  exp = Experiment.from_flagfile("flags/quickstart.cfg", model_dir="/tmp/q", train_steps=40)
  strategy = experiment.setup(exp)          # once per process, before other TensorFlow work
  experiment.pretrain(exp, strategy)        # train, export the encoder, kNN, plots
  experiment.linear_eval(exp, strategy)     # probe on frozen features, classifier export

`strategy` may be omitted (setup(exp) is then called on first use).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

from nnclr_tf import checkpoints, distributed, linear_probe, linear_sgd, pretraining, progress
from nnclr_tf import continuous_eval as continuous_lib
from nnclr_tf import data as data_lib
from nnclr_tf import export as export_lib
from nnclr_tf import finetune as finetune_lib
from nnclr_tf import model_dir as md
from nnclr_tf.building import (  # the public API: experiment.build_model and friends
  build_encoder,
  build_model,
  eval_data,
  load_data,
  nnclr_config,
  quiet_tensorflow,
  restored_model,
  setup,
  strategy_for,
)
from nnclr_tf.checks import check_batch
from nnclr_tf.config import Experiment, imagenet_subset
from nnclr_tf.errors import ConfigError, DataError, ExportError, ModelDirError
from nnclr_tf.results import (
  ContinuousEvalResults,
  ExportResults,
  FinetuneResults,
  KnnEvalResults,
  LinearEvalResults,
  PlotsResults,
  PretrainResults,
)
from nnclr_tf.scoring import (
  classifier_metadata,
  eval_features,
  feature_cache,
  knn_results,
  labelled_splits,
  random_init_features,
  write_plots,
)


def _locked(mode):
  """Runs the mode holding model_dir/run.lock (model_dir.lock: pretraining's, on the chief; the
  other modes are readers and take none)."""

  def wrap(fn):
    @functools.wraps(fn)
    def run(exp, *args, **kwargs):
      with md.lock(exp.train.model_dir, mode):
        return fn(exp, *args, **kwargs)
    return run
  return wrap


# --- pretrain ----------------------------------------------------------------------------------

@_locked("pretrain")
def pretrain(exp: Experiment, strategy=None, flags_text: str | None = None) -> PretrainResults:
  """Trains (resuming from the model_dir), then on the chief runs kNN of the final checkpoint,
  writes the plots and exports the encoder (pretraining.train, .evaluate, .export). A model_dir
  whose run is complete is left as it is; parts missing after a crash (export, kNN, plots) run
  alone. `flags_text` goes to flags.txt (default: the experiment as JSON)."""
  strategy = strategy_for(exp, strategy)
  t = exp.train
  if t.checkpoint:
    raise ConfigError(f"--checkpoint={t.checkpoint} chooses the checkpoint of knn_eval, "
                      "linear_eval, finetune, plots and export; --mode=pretrain always resumes "
                      "from the newest: drop --checkpoint")
  # Before the data loads (minutes on a large set); training.pretrain checks again with the
  # dataset's size.
  check_batch(t.batch_size, exp.support.queue_size, strategy.num_replicas_in_sync,
              exp.support.nn_topk)
  done = pretraining.finished_pretraining(t, exp.plots.enabled)
  if done:
    print(done)
    return md.read_results(t.model_dir, "pretrain")
  run = pretraining.train(exp, strategy, flags_text)
  if not run.chief:
    return run.results
  pretraining.evaluate(exp, run)
  return pretraining.export(exp, run)


def knn_eval(exp: Experiment, strategy=None) -> KnnEvalResults:
  """Weighted kNN of the newest checkpoint's (or --checkpoint's) backbone features, eval split
  against train split."""
  strategy = strategy_for(exp, strategy)
  model, latest = restored_model(exp, strategy)
  train, held = eval_data(exp)
  # Features extracted afresh, not from the cache: that checks the restore.
  results: KnnEvalResults = {**knn_results(exp, model, train, held), "checkpoint": latest}
  if distributed.is_chief(strategy):  # multi-worker: only the chief writes into model_dir
    md.write_results(exp.train.model_dir, "knn_eval", results)
  return results


# --- linear_eval, finetune, plots --------------------------------------------------------------


def linear_eval(exp: Experiment, strategy=None) -> LinearEvalResults:
  """Linear probe of the latest checkpoint's frozen encoder, by --linear_protocol: lbfgs on
  cached features (and of the random-init architecture), or sgd on streamed crop + flip views
  (linear_sgd.py); then the classifier export of the probe, which reads both alike."""
  strategy = strategy_for(exp, strategy)
  t, protocol = exp.train, exp.probe.linear_protocol
  train, held, classes = labelled_splits(exp, "linear_eval")
  model, latest = restored_model(exp, strategy)
  fit = _sgd_probe if protocol == "sgd" else _lbfgs_probe
  probe, results = fit(exp, strategy, model, latest, train, held, classes)
  results.update(protocol=protocol, checkpoint=latest,
                 probe=linear_probe.save_probe(md.path(t.model_dir, md.PROBE_FILE), probe))
  ex = exp.export
  results["classifier_export_dir"] = export_lib.export_classifier(
      model, results["probe"], ex.base, ex.version, ex.warmup,
      metadata=classifier_metadata(exp, latest, results),
      crop_fraction=exp.data.eval_crop_fraction)
  return md.write_results(t.model_dir, "linear_eval", results)


def _lbfgs_probe(exp: Experiment, strategy, model, latest, train, held, classes):
  t, size = exp.train, exp.data.image_size
  l2 = list(exp.probe.linear_l2)
  cache = feature_cache(exp, latest)
  train_f, train_l, eval_f, eval_l = eval_features(exp, model.encoder, latest, train, held)
  with progress.timed(f"linear probe on {len(train_l):,} features (l2 from {len(l2)} values)"):
    probe, info = linear_probe.fit_probe(train_f, train_l, classes, train.class_names, size,
                                         l2=l2, seed=t.seed)
  scores = linear_probe.evaluate_probe(probe, eval_f, eval_l)
  results: LinearEvalResults = {
      "linear_top1": scores["top1"], "linear_top5": scores["top5"], **info,
      "eval_examples": int(len(eval_l)), "feature_dim": int(train_f.shape[1]),
      "feature_cache": cache}
  if exp.eval.random_init_baseline:
    rf = random_init_features(exp, train, held)  # the encoder of knn_top1_random_init
    with progress.timed("linear probe on the random-init features"):
      rand, rand_info = linear_probe.fit_probe(rf[0], rf[1], classes, l2=l2, seed=t.seed)
    rand_scores = linear_probe.evaluate_probe(rand, rf[2], rf[3])
    results.update({"linear_top1_random_init": rand_scores["top1"],
                    "linear_top5_random_init": rand_scores["top5"],
                    "l2_random_init": rand_info["l2"]})
  return probe, results


def _sgd_probe(exp: Experiment, strategy, model, latest, train, held, classes):
  t, p, size = exp.train, exp.probe, exp.data.image_size
  if exp.eval.random_init_baseline:
    # A second SGD run as long as the first (90 ImageNet epochs) for a number only the
    # comparison with random weights needs.
    logging.info("--linear_protocol=sgd: no linear_top1_random_init (it would repeat the whole "
                 "fit); --linear_protocol=lbfgs scores it")
  out_dir = linear_sgd.run_dir(t.model_dir, latest, linear_sgd.settings_key(
      exp.data, exp.augment, p.linear_lr, p.linear_epochs, p.linear_batch_size, t.seed))
  with progress.timed(f"SGD linear head on {len(train):,} images, {p.linear_epochs} epochs"):
    probe, info = linear_sgd.fit(
        model.encoder, train, held, classes, size, exp.augment, out_dir,
        learning_rate=p.linear_lr, epochs=p.linear_epochs, batch_size=p.linear_batch_size,
        seed=t.seed, strategy=strategy, class_names=train.class_names,
        eval_batch_size=exp.eval.batch_size, eval_crop_fraction=exp.data.eval_crop_fraction,
        checkpoint_every_steps=t.checkpoint_every_steps, keep_checkpoints=t.keep_checkpoints,
        verbose=t.verbose)
  return probe, {**info, "feature_cache": None}


def finetune(exp: Experiment, strategy=None) -> FinetuneResults:
  """Semi-supervised fine-tune of the whole network on a labelled fraction (or from scratch with
  finetune.init="random"); every (fraction, init) run is kept in the results. On ImageNet the
  labelled images are SimCLR's published subset (tfds imagenet2012_subset/1pct or /10pct,
  streamed from --data_dir); elsewhere a class-balanced draw."""
  strategy = strategy_for(exp, strategy)
  t, f = exp.train, exp.finetune
  # Before the run: a damaged record of earlier runs is one error line, not lost work.
  recorded: FinetuneResults = md.read_results(t.model_dir, "finetune")
  subset = imagenet_subset(exp.data.dataset, f.label_fraction)
  # Before the model and the data: a subset missing from --data_dir is one error line.
  labelled = data_lib.imagenet_subset_source(exp.data, f.label_fraction) if subset else None
  train, held, classes = labelled_splits(exp, "finetune")
  if labelled is not None:
    if labelled.class_names != train.class_names:
      raise DataError(f"{labelled.name} and {train.name} name different classes; prepare both "
                      f"with the same tensorflow-datasets in --data_dir={exp.data.data_dir}")
    train = labelled
  if f.init == "random":
    model, latest = build_model(exp, strategy), None
  else:
    model, latest = restored_model(exp, strategy)
  results = finetune_lib.finetune(
      model.encoder, train, held, classes, exp.data.image_size, exp.augment,
      label_fraction=f.label_fraction, epochs=f.epochs, batch_size=f.batch_size,
      learning_rate=f.learning_rate, momentum=f.momentum, weight_decay=f.weight_decay,
      seed=t.seed, strategy=strategy, eval_batch_size=exp.eval.batch_size, verbose=t.verbose,
      eval_crop_fraction=exp.data.eval_crop_fraction, subset=subset)
  results.update(init=f.init, checkpoint=latest)
  # The latest run at the top level; every (fraction, init) run kept under by_label_fraction.
  runs = recorded.get("by_label_fraction", {})
  key = f"{f.label_fraction:g}" + ("" if f.init == "pretrained" else "_random_init")
  runs[key] = results.copy()
  md.write_results(t.model_dir, "finetune", {**results, "by_label_fraction": runs})
  return results


def plots(exp: Experiment, strategy=None) -> PlotsResults:
  """Retrieval grid, embedding map and training curves of the latest checkpoint."""
  strategy = strategy_for(exp, strategy)
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


def classifier_probe(model_dir, checkpoint):
  """(probe, linear_eval results) for the classifier export of `checkpoint`, or (None, {}) with
  one warning line saying why there is no classifier: no probe, a probe of another checkpoint,
  or a damaged probe.npz or linear_eval_results.json (then which checkpoint it fits is unknown).
  The encoder is exported either way."""
  path = md.path(model_dir, md.PROBE_FILE)
  if not os.path.exists(path):
    logging.warning("no linear probe at %s: classifier not exported (run --mode=linear_eval)",
                    path)
    return None, {}
  linear = md.read_results(model_dir, "linear_eval", damaged="warn",
                           consequence="which checkpoint the linear probe was fitted on is not "
                           "known, so the classifier is not exported (run --mode=linear_eval)")
  if not linear and os.path.exists(md.results_path(model_dir, "linear_eval")):
    return None, {}  # damaged (warned); a probe without results is an older or hand-made one
  fitted_on = linear.get("checkpoint")
  step = checkpoints.checkpoint_step(checkpoint)
  if fitted_on and checkpoints.checkpoint_step(fitted_on) != step:
    # Its probe reads the features of another checkpoint: serving it on this one would be wrong.
    logging.warning("the linear probe %s was fitted on %s, not %s: classifier not exported "
                    "(run --mode=linear_eval with the same --checkpoint)", path,
                    os.path.basename(fitted_on), os.path.basename(checkpoint))
    return None, {}
  try:
    return export_lib.load_probe(path), linear
  except ExportError as err:
    logging.warning("%s; classifier not exported", err)
    return None, {}


def export(exp: Experiment, strategy=None) -> ExportResults:
  """Encoder (and, when linear_eval has written its probe, classifier) SavedModels of the newest
  checkpoint (or the one --checkpoint names), in TF Serving's layout."""
  strategy = strategy_for(exp, strategy)
  t, e = exp.train, exp.export
  latest = checkpoints.resolve_checkpoint(t.model_dir, t.checkpoint)
  model = build_model(exp, strategy)
  md.prepare(t.model_dir, model.get_config())
  checkpoints.restore(model, latest, strict=True)  # the optimizer is not needed
  meta = md.export_metadata(t.model_dir, checkpoints.checkpoint_step(latest), exp.data.image_size,
                            checkpoint=latest)
  crop = exp.data.eval_crop_fraction
  probe, linear = classifier_probe(t.model_dir, latest)
  out = {"encoder": export_lib.export_encoder(model, e.base, e.version, e.warmup, metadata=meta,
                                              crop_fraction=crop)}
  if probe is not None:
    out["classifier"] = export_lib.export_classifier(
        model, probe, e.base, e.version, e.warmup,
        metadata=classifier_metadata(exp, latest, linear), crop_fraction=crop)
  results: ExportResults = {"checkpoint": latest, "encoder_export_dir": out["encoder"],
                            "encoder_export_bytes": export_lib.dir_size(out["encoder"])}
  if "classifier" in out:
    results.update({"classifier_export_dir": out["classifier"],
                    "classifier_export_bytes": export_lib.dir_size(out["classifier"])})
  return md.write_results(t.model_dir, "export", results)


# --- continuous_eval ---------------------------------------------------------------------------

def continuous_eval(exp: Experiment, strategy=None) -> ContinuousEvalResults:
  """Follows the model_dir while pretraining writes it (another process, another host): kNN,
  and with --continuous_eval_linear the linear probe, of each new checkpoint, one line each in
  continuous_eval.jsonl; returns when the run's last step is scored or after --eval_timeout
  seconds without a new checkpoint (nnclr_tf/continuous_eval.py)."""
  strategy = strategy_for(exp, strategy)
  t = exp.train
  md.recorded_model_config(t.model_dir)  # one error line when it is damaged, as restored_model
  train, held, classes = labelled_splits(exp, "continuous_eval")
  model = build_model(exp, strategy)
  # The bank is the training split (or its labelled part): the run's last step, or near it;
  # a finished run's recorded step ends the loop anyway (continuous_eval.run_finished).
  target = t.train_steps or t.train_epochs * data_lib.steps_per_epoch(len(train), t.batch_size)
  scored, timed_out = continuous_lib.follow(exp, model, train, held, classes, target)
  records = continuous_lib.records(t.model_dir)
  last = max(records, key=lambda r: r["step"]) if records else {}
  results: ContinuousEvalResults = {"scored_steps": scored, "last_step": last.get("step", 0),
                                    "timed_out": timed_out,
                                    "results_file": md.path(t.model_dir, continuous_lib.FILE)}
  for key in ("checkpoint", "knn_top1", "linear_top1"):
    if key in last:
      results[key] = last[key]
  return results


MODES = {"pretrain": pretrain, "knn_eval": knn_eval, "linear_eval": linear_eval,
         "finetune": finetune, "plots": plots, "export": export,
         "continuous_eval": continuous_eval}
EXPORTING_MODES = ("pretrain", "linear_eval", "export")

__all__ = ["setup", "quiet_tensorflow", "nnclr_config", "build_model", "build_encoder",
           "restored_model", "load_data", "eval_data", "pretrain", "knn_eval", "linear_eval",
           "finetune", "plots", "export", "continuous_eval", "MODES", "EXPORTING_MODES",
           "ModelDirError"]
