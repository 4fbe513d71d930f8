"""nnclr_tf command line: the only place flags are defined and read.

  python run.py --mode=pretrain --flagfile=flags/quickstart.cfg
  python run.py --mode=knn_eval --flagfile=flags/quickstart.cfg
  python run.py --mode=linear_eval --flagfile=flags/quickstart.cfg
  python run.py --mode=finetune --label_fraction=0.1 --flagfile=flags/quickstart.cfg
  python run.py --mode=plots --flagfile=flags/quickstart.cfg
  python run.py --mode=export --flagfile=flags/quickstart.cfg

Flag precedence. Anything on the command line beats every --flagfile, whatever the order:
`--mode=linear_eval --flagfile=preset` and `--flagfile=preset --mode=linear_eval` are the same
command. Several --flagfile arguments are read in their command-line order (a later file wins). A
`--flagfile=other` line inside a file is expanded where it stands, and within the files later
lines win, so a file that starts with `--flagfile=preset` and then sets flags overrides the
preset. A flag given twice on the command line takes the last value. Flagfile paths, nested ones
included, are relative to the current directory.

Flags become config dataclasses (nnclr_tf/config.py); library code never reads FLAGS.
Exit codes: 0 done, 2 a flag/file/model_dir mistake (one `error:` line says what to change),
3 training diverged (NaN/Inf; the last finite checkpoint is kept). Rerunning resumes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Performance (issue 7): TensorFlow leaves its oneDNN CPU kernels off unless the CPU has
# AVX512-VNNI/BF16 or AMX; without them convolutions run on slower Eigen kernels (the ResNet-18
# step took ~40% more CPU time, benchmarks/RESULTS.md). TF_ENABLE_ONEDNN_OPTS=0 still turns it off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging  # noqa: E402

F = flags.FLAGS
MODES = ("pretrain", "knn_eval", "linear_eval", "finetune", "plots", "export")

flags.DEFINE_enum("mode", "pretrain", MODES, "What to run.")
flags.DEFINE_string("model_dir", "/tmp/nnclr", "Checkpoints, logs, exports and results go here.")
# Data
flags.DEFINE_string("dataset", "digits", "digits | folder | any prepared tfds image dataset name.")
flags.DEFINE_string("image_dir", None, "--dataset=folder: class sub-folders or a flat folder.")
flags.DEFINE_string("eval_image_dir", None, "--dataset=folder: held-out images for evaluation.")
flags.DEFINE_integer("val_images", 0, "Carve a seeded class-balanced held-out set of this size.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (nothing is downloaded).")
flags.DEFINE_string("train_split", "train", "tfds split to pretrain on.")
flags.DEFINE_string("eval_split", "test", "tfds split to evaluate on ('' for none).")
flags.DEFINE_integer("image_size", 32, "Training resolution (square).")
flags.DEFINE_integer("cache_limit_mb", 2048, "Hold decoded images in memory up to this size.")
# Augmentation (BYOL asymmetric pipeline; pairs are view1,view2)
flags.DEFINE_float("crop_min_scale", 0.08, "Random resized crop: smallest area fraction.")
flags.DEFINE_float("flip_prob", 0.5, "Horizontal flip probability.")
flags.DEFINE_float("jitter_prob", 0.8, "Colour jitter probability.")
flags.DEFINE_float("brightness", 0.4, "Colour jitter brightness strength.")
flags.DEFINE_float("contrast", 0.4, "Colour jitter contrast strength.")
flags.DEFINE_float("saturation", 0.2, "Colour jitter saturation strength.")
flags.DEFINE_float("hue", 0.1, "Colour jitter hue strength.")
flags.DEFINE_float("grayscale_prob", 0.2, "Grayscale probability.")
flags.DEFINE_list("blur_prob", ["1.0", "0.1"], "Gaussian blur probability for view1,view2.")
flags.DEFINE_list("solarize_prob", ["0.0", "0.2"], "Solarize probability for view1,view2.")
# Model
flags.DEFINE_enum("backbone", "resnet50", ["resnet50", "resnet18_cifar", "small_cnn"], "Encoder.")
flags.DEFINE_integer("width", 64, "Base channel width of the backbone.")
flags.DEFINE_integer("proj_hidden_dim", 2048, "Projection MLP hidden size.")
flags.DEFINE_integer("proj_layers", 3, "Projection MLP depth (paper: 3).")
flags.DEFINE_integer("pred_hidden_dim", 4096, "Prediction MLP hidden size.")
flags.DEFINE_integer("embedding_dim", 256, "Embedding size d.")
flags.DEFINE_bool("global_bn", True, "Synchronise BatchNorm statistics across replicas.")
# NNCLR
flags.DEFINE_integer("queue_size", 98304, "Support set size; a multiple of --batch_size.")
flags.DEFINE_float("temperature", 0.1, "InfoNCE temperature.")
flags.DEFINE_integer("nn_topk", 1, "Sample the positive uniformly from the top-k neighbours.")
flags.DEFINE_bool("use_nn", True, "False: the positive is the other view (SimCLR ablation).")
# Optimisation
flags.DEFINE_integer("batch_size", 4096, "Global batch size (all replicas and workers).")
flags.DEFINE_integer("train_epochs", 1000, "Epochs to train.")
flags.DEFINE_integer("train_steps", 0, "If > 0, overrides --train_epochs.")
flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd", "adamw"], "Optimizer.")
flags.DEFINE_float("learning_rate", 0.3, "Base learning rate (scaled by --lr_scaling).")
flags.DEFINE_enum("lr_scaling", "linear", ["linear", "sqrt", "none"], "x B/256, x sqrt(B/256).")
flags.DEFINE_float("weight_decay", 1e-6, "Weight decay (biases and BN excluded).")
flags.DEFINE_float("momentum", 0.9, "Momentum (LARS, SGD).")
flags.DEFINE_float("lars_eta", 0.001, "LARS trust coefficient.")
flags.DEFINE_float("warmup_epochs", 10, "Linear warm-up length in epochs.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
# Runtime
flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multi_worker", "tpu", "one_device"],
                  "Distribution strategy.")
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (Mirrored tests).")
flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "fp16"], "Compute dtype.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps (0: epochs only).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many checkpoints to keep.")
flags.DEFINE_integer("verbose", 1, "Keras progress: 0 silent, 1 bar, 2 one line per epoch.")
# Evaluation
flags.DEFINE_integer("knn_k", 200, "kNN neighbours.")
flags.DEFINE_float("knn_temperature", 0.1, "kNN vote temperature.")
flags.DEFINE_integer("eval_batch_size", 256, "Batch size for feature extraction.")
# Evaluation modes and monitors (linear_eval, finetune, plots, online probe; issue 4)
flags.DEFINE_bool("online_probe", True, "Train an online linear probe on stop-gradient backbone "
                  "features during pretraining (only when the training data is labelled).")
flags.DEFINE_float("online_probe_lr", 1e-2, "Adam learning rate of the online probe.")
flags.DEFINE_list("linear_l2", ["1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
                  "L2 strengths of the linear probe; several: chosen on 10% of the train features.")
flags.DEFINE_float("label_fraction", 0.1, "--mode=finetune: class-balanced labelled fraction.")
flags.DEFINE_integer("finetune_epochs", 0, "Fine-tune epochs (0: SimCLR's 60 for <=1% labels, "
                     "else 30, but at least 300 steps).")
flags.DEFINE_integer("finetune_batch_size", 256, "Fine-tune global batch (capped at the subset).")
flags.DEFINE_float("finetune_lr", 0.05, "Fine-tune base lr, x batch/256 (SimCLR: 0.05).")
flags.DEFINE_enum("finetune_init", "pretrained", ["pretrained", "random"],
                  "Fine-tune the pretrained encoder, or train from scratch (the baseline).")
flags.DEFINE_bool("linear_random_init", True, "--mode=linear_eval: also probe the architecture at "
                  "random initialisation (the baseline, as knn_top1_random_init).")
flags.DEFINE_bool("plots", True, "--mode=pretrain: write the plots into model_dir/plots at the end.")
flags.DEFINE_integer("plot_tsne_points", 2000, "At most this many points in the t-SNE map.")

# Export for TF Serving (issue 5): <export_base>/<encoder|classifier>/<version>/
flags.DEFINE_string("export_base", None, "TF Serving model base path (default <model_dir>/export).")
flags.DEFINE_integer("export_version", 0, "Version to write; 0: one past the newest. An existing "
                     "version is never overwritten.")
# Reliability (issue 6): bad inputs, reproducibility.
flags.DEFINE_bool("skip_bad_images", True, "Leave undecodable image files out (counted in the "
                  "results as skipped_images); --noskip_bad_images makes them an error.")
flags.DEFINE_bool("deterministic", False, "TF op determinism: with --seed, reruns give identical "
                  "losses and weights (no measurable cost on CPU; may be slower on GPU).")

EXIT_USAGE = 2     # a flag, file or model_dir problem; the message says what to change
EXIT_DIVERGED = 3  # NaN/Inf loss; the last good checkpoint is kept


class UsageError(Exception):
  pass


def _pair(name):
  values = getattr(F, name)
  try:
    pair = tuple(float(v) for v in values)
  except ValueError:
    pair = ()
  if len(pair) != 2 or not all(0.0 <= v <= 1.0 for v in pair):
    raise UsageError(f"--{name}={','.join(values)}: give two probabilities in [0,1], e.g. 1.0,0.1")
  return pair


def configs():
  from nnclr_tf import config as c
  if F.temperature <= 0:
    raise UsageError(f"--temperature={F.temperature} must be > 0 (the paper uses 0.1)")
  if F.image_size < 8:
    raise UsageError(f"--image_size={F.image_size} is too small; use 8 or more")
  if not 0 < F.crop_min_scale <= 1:
    raise UsageError(f"--crop_min_scale={F.crop_min_scale} must be in (0, 1]")
  if F.train_steps < 0 or F.train_epochs < 0:
    raise UsageError("--train_steps and --train_epochs must be >= 0")
  if F.dataset == "folder" and not F.image_dir:
    raise UsageError("--dataset=folder needs --image_dir=<folder of images>")
  if F.export_version < 0:
    raise UsageError(f"--export_version={F.export_version} must be >= 0 (0: the next version)")
  _check_reliability_flags()
  for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
    if not 0 <= getattr(F, name) <= 1:
      raise UsageError(f"--{name}={getattr(F, name)} must be a probability in [0, 1]")
  return dict(
      data=c.DataConfig(dataset=F.dataset, image_dir=F.image_dir, eval_image_dir=F.eval_image_dir,
                        val_images=F.val_images, data_dir=F.data_dir, train_split=F.train_split,
                        eval_split=F.eval_split, image_size=F.image_size,
                        cache_limit_mb=F.cache_limit_mb,
                        skip_bad_images=F.skip_bad_images),
      augment=c.AugmentConfig(crop_scale=(F.crop_min_scale, 1.0), flip_prob=F.flip_prob,
                              jitter_prob=F.jitter_prob, brightness=F.brightness,
                              contrast=F.contrast, saturation=F.saturation, hue=F.hue,
                              grayscale_prob=F.grayscale_prob, blur_prob=_pair("blur_prob"),
                              solarize_prob=_pair("solarize_prob")),
      model=c.ModelConfig(backbone=F.backbone, proj_hidden_dim=F.proj_hidden_dim,
                          proj_layers=F.proj_layers, pred_hidden_dim=F.pred_hidden_dim,
                          embedding_dim=F.embedding_dim, global_bn=F.global_bn, width=F.width),
      support=c.SupportSetConfig(queue_size=F.queue_size, nn_topk=F.nn_topk, use_nn=F.use_nn),
      optim=c.OptimConfig(optimizer=F.optimizer, learning_rate=F.learning_rate,
                          lr_scaling=F.lr_scaling, weight_decay=F.weight_decay,
                          momentum=F.momentum, lars_eta=F.lars_eta,
                          warmup_epochs=F.warmup_epochs),
      train=c.TrainConfig(model_dir=F.model_dir, batch_size=F.batch_size,
                          train_epochs=F.train_epochs, train_steps=F.train_steps,
                          temperature=F.temperature, seed=F.seed,
                          checkpoint_every_steps=F.checkpoint_every_steps,
                          keep_checkpoints=F.keep_checkpoints, jit_compile=F.jit_compile,
                          verbose=F.verbose),
      eval=c.EvalConfig(knn_k=F.knn_k, knn_temperature=F.knn_temperature,
                        batch_size=F.eval_batch_size),
      export=c.ExportConfig(base=F.export_base or os.path.join(F.model_dir, "export"),
                            version=F.export_version),
  )


def _check_reliability_flags():
  import math
  if not 1 <= F.nn_topk <= F.queue_size:
    raise UsageError(f"--nn_topk={F.nn_topk} must be between 1 and --queue_size={F.queue_size}")
  if not (math.isfinite(F.learning_rate) and F.learning_rate > 0):
    raise UsageError(f"--learning_rate={F.learning_rate} must be a finite number > 0")
  if F.keep_checkpoints < 1:
    raise UsageError(f"--keep_checkpoints={F.keep_checkpoints} must be >= 1")
  if F.checkpoint_every_steps < 0:
    raise UsageError(f"--checkpoint_every_steps={F.checkpoint_every_steps} must be >= 0 "
                     "(0: only at epoch ends)")


def check_batch(cfg, strategy):
  """Batch/queue/top-k consistency, before anything is built or written."""
  from nnclr_tf import training
  training.validate_batch(cfg["train"].batch_size, cfg["support"].queue_size,
                          strategy.num_replicas_in_sync, cfg["support"].nn_topk)


def prepare_model_dir(model_dir, model_config, model=None):
  """Creates model_dir, refuses one that holds a different architecture, records the config.

  A model_dir with a checkpoint but no model_config.json (written by the Python API) is checked
  by loading the checkpoint into `model` when it is given; without it no config is recorded."""
  import json
  # The online probe is a training monitor, not the architecture (eval and export modes build the
  # model without it; a resume sizes it from the checkpoint): it is neither recorded nor compared.
  model_config = _architecture(model_config)
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = os.path.join(model_dir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--model_dir={model_dir} is not writable ({e.strerror}); choose another")
  path = os.path.join(model_dir, "model_config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = {k: v for k, v in json.load(f).items() if not k.startswith("online_probe")}
    # Keras numbers model names per process (nnclr, nnclr_1, ...): not part of the architecture.
    diff = sorted(k for k in set(old) | set(model_config)
                  if k != "name" and old.get(k) != model_config.get(k))
    if diff:
      raise UsageError(
          f"--model_dir={model_dir} holds a model with different {', '.join(diff)} "
          f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use a new --model_dir or the "
          "same flags")
  elif model is not None or not _has_checkpoint(model_dir):
    if model is not None:
      from nnclr_tf import training
      training.check_checkpoint_fits(model, model_dir)
    from nnclr_tf import training
    training.write_json(path, model_config)


def _architecture(model_config):
  return {k: v for k, v in model_config.items() if not k.startswith("online_probe")}


def _has_checkpoint(model_dir):
  return os.path.exists(os.path.join(model_dir, "checkpoint"))


def build_model(cfg, strategy, online_probe_classes=0):
  import keras
  from nnclr_tf.model import NNCLR
  keras.utils.set_random_seed(cfg["train"].seed)
  with strategy.scope():
    return NNCLR.from_configs(cfg["model"], cfg["support"], cfg["data"].image_size,
                              cfg["train"].temperature, cfg["train"].seed, online_probe_classes,
                              F.online_probe_lr)


def knn_results(cfg, model, train, held, checkpoint=None):
  """kNN of the trained encoder and of the same architecture at random initialisation.

  With `checkpoint` (the path `model` holds), features come from and go to the cache shared with
  linear_eval and plots (model_dir/features)."""
  from nnclr_tf import evaluation
  if held is None or not train.has_labels or not held.has_labels:
    logging.info("no labelled eval split: kNN skipped")
    return {}
  if len(set(train.labels.tolist())) < 2:  # one class: every vote is right, a meaningless 100%
    logging.warning("kNN skipped: the training images have a single class (%s)",
                    ", ".join(train.class_names) or "0")
    return {}
  e, size = cfg["eval"], cfg["data"].image_size
  num_classes = len(train.class_names) or int(max(train.labels.max(), held.labels.max())) + 1
  out = evaluation.knn_eval_features(
      *eval_features(cfg, model.encoder, checkpoint, train, held, use_cache=bool(checkpoint)),
      num_classes, e.knn_k, e.knn_temperature)
  rand = evaluation.knn_eval_features(*random_init_features(cfg, train, held), num_classes,
                                      e.knn_k, e.knn_temperature)
  out.update(knn_top1_random_init=rand["knn_top1"], knn_top5_random_init=rand["knn_top5"],
             knn_k=e.knn_k, knn_temperature=e.knn_temperature, eval_examples=len(held))
  return out


RESULTS_FILE = "pretrain_results.json"


def checkpoint_step(path):
  """N of a `.../ckpt-N` checkpoint path (0 for None)."""
  tail = (path or "").rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def target_steps(t, recorded):
  """The step this run trains to, if it can be known before the data is loaded (from the
  steps per epoch a finished run recorded at the same global batch), else None."""
  if t.train_steps:
    return t.train_steps
  if recorded.get("global_batch") == t.batch_size and recorded.get("steps_per_epoch"):
    return t.train_epochs * int(recorded["steps_per_epoch"])
  return None


def finished_pretraining(cfg):
  """A one-line summary when model_dir's pretraining reached its last step and its kNN, plots and
  encoder export exist (a rerun then has nothing to do), else None."""
  import tensorflow as tf
  from nnclr_tf import export, training
  t = cfg["train"]
  recorded = training.read_json(os.path.join(t.model_dir, RESULTS_FILE))
  step = recorded.get("steps")
  if not step or checkpoint_step(tf.train.latest_checkpoint(t.model_dir)) != step:
    return None
  if target_steps(t, recorded) != step or not _evaluated(recorded):
    return None
  if F.plots and not _plots_exist(recorded):
    return None
  export_dir = recorded.get("export_dir")
  if not export_dir or export.read_metadata(export_dir).get("checkpoint_step") != step:
    return None
  return (f"{t.model_dir}: pretraining finished at step {step}; results in "
          f"{os.path.join(t.model_dir, RESULTS_FILE)}, encoder export {export_dir}; nothing to "
          "do (raise --train_steps or --train_epochs to train longer)")


def _evaluated(recorded):
  return recorded.get("knn_top1") is not None or bool(recorded.get("knn_skipped"))


def _plots_exist(recorded):
  paths = recorded.get("plots") or {}
  return bool(paths) and all(os.path.exists(p) for p in paths.values())


def merge_results(recorded, results):
  """New figures over the recorded ones of the same step; a recorded figure is never replaced by
  None (a rerun that trained nothing has no loss or speed of its own)."""
  if recorded.get("steps") != results.get("steps"):
    return results
  merged = dict(recorded)
  merged.update({k: v for k, v in results.items() if v is not None or k not in recorded})
  return merged


def run_pretrain(cfg, strategy):
  from nnclr_tf import data, distributed, export, training
  t = cfg["train"]
  check_batch(cfg, strategy)
  done = finished_pretraining(cfg)
  if done:
    print(done)
    recorded = training.read_json(os.path.join(t.model_dir, RESULTS_FILE))
    return recorded
  results_path = os.path.join(t.model_dir, RESULTS_FILE)
  recorded = training.read_json(results_path)
  # The online probe's size comes from the data, so the data is loaded before the model is built.
  train, held = data.load_sources(cfg["data"], t.seed)
  logging.info("training on %d images (%s), %d held out, %d unreadable skipped", len(train),
               train.name, 0 if held is None else len(held), train.skipped)
  model = build_model(cfg, strategy, online_probe_classes(train, t.model_dir, strategy))
  chief = distributed.is_chief(strategy)
  if chief:
    prepare_model_dir(t.model_dir, model.get_config(), model)
    training.write_text(os.path.join(t.model_dir, "flags.txt"), F.flags_into_string())
  total = t.train_steps or t.train_epochs * data.steps_per_epoch(len(train), t.batch_size)
  if recorded.get("steps") and total > recorded["steps"]:
    logging.warning("%s finished pretraining at step %d; continuing to step %d: the warm-up + "
                    "cosine learning-rate schedule is recomputed for %d steps, so the rate "
                    "jumps back up at step %d", t.model_dir, recorded["steps"], total, total,
                    recorded["steps"])
  curves = curve_logger(t, train, strategy)
  results = training.pretrain(model, strategy, train, cfg["data"], cfg["augment"], t,
                              cfg["optim"], callbacks=[curves])
  results["online_probe_acc"] = curves.last_logs.get("online_probe_acc")
  if not chief:
    return results
  step = results["steps"]
  same_step = recorded.get("steps") == step
  e = cfg["export"]
  newest, meta = export.newest_export(e.base)
  if not e.version and newest and meta.get("checkpoint_step") == step:
    export_dir = newest  # this checkpoint is served already
  else:
    export_dir = export.export_encoder(model, e.base, e.version, e.warmup,
                                       metadata=export_metadata(t.model_dir, step))
  final = checkpoint_at(t.model_dir, step)
  if not (same_step and _evaluated(recorded)):
    knn = knn_results(cfg, model, train, held, final)
    results.update(knn or {"knn_skipped": True})
  if F.plots and not (same_step and _plots_exist(recorded)):
    results["plots"] = write_plots(cfg, model, train, held, step, final)
  results.update(export_dir=export_dir, train_examples=len(train), skipped_images=train.skipped,
                 skipped_eval_images=0 if held is None else held.skipped,
                 global_batch=t.batch_size, replicas=strategy.num_replicas_in_sync)
  results = merge_results(recorded, results)
  training.write_json(results_path, results)
  return results


def export_metadata(model_dir, step):
  """What `assets.extra/nnclr_tf.json` records of an export's origin."""
  return {"checkpoint_step": int(step), "model_dir": os.path.abspath(model_dir)}


def run_knn_eval(cfg, strategy):
  from nnclr_tf import data, training
  t = cfg["train"]
  model, latest = restored_model(cfg, strategy)
  train, held = data.load_sources(cfg["data"], t.seed)
  results = knn_results(cfg, model, train, held)  # extracted afresh: checks the restore
  results["checkpoint"] = latest
  from nnclr_tf import distributed
  if distributed.is_chief(strategy):  # multi-worker: only the chief writes into model_dir
    training.write_json(os.path.join(t.model_dir, "knn_results.json"), results)
  return results


# --- Evaluation modes: linear_eval, finetune, plots (issue 4) ------------------------------------

def online_probe_classes(train, model_dir, strategy):
  """Classes of the online probe; 0 (off) without --online_probe or without labels.

  A resumed run keeps what its checkpoint holds (a probe of its size, or none), so that turning
  the flag on for a model_dir pretrained without it, or a different label count, never breaks
  the restore; a new run sizes the probe from the training labels."""
  import numpy as np
  import tensorflow as tf
  from nnclr_tf import distributed
  if not F.online_probe:
    return 0
  latest = tf.train.latest_checkpoint(distributed.worker_dir(model_dir, strategy))
  if latest:
    try:
      kernels = [shape for name, shape in tf.train.list_variables(latest)
                 if name.startswith("model/online_probe/") and "kernel" in name]
      return int(kernels[0][-1]) if kernels else 0
    except (tf.errors.OpError, ValueError):
      pass  # an unreadable checkpoint: the restore reports it
  labels = getattr(train, "labels", None)
  if labels is None:  # a streamed tfds split
    return len(train.class_names) if train.has_labels else 0
  labels = np.asarray(labels)
  if not (labels >= 0).any():
    return 0
  return max(len(train.class_names), int(labels.max()) + 1)


def checkpoint_at(model_dir, step):
  """The latest checkpoint if it holds `step` (the model's state after pretraining), else None."""
  import tensorflow as tf
  latest = tf.train.latest_checkpoint(model_dir)
  return latest if latest and latest.endswith(f"-{step}") else None


def feature_cache(cfg, checkpoint):
  """model_dir/features/... of the encoder at `checkpoint` (None: the random-init encoder)."""
  import dataclasses
  from nnclr_tf import evaluation
  t = cfg["train"]
  extra = None if checkpoint else {"random_init": dataclasses.asdict(cfg["model"]),
                                   "seed": t.seed + 1}
  return evaluation.feature_cache_path(t.model_dir, checkpoint, cfg["data"], t.seed, extra)


def eval_features(cfg, encoder, checkpoint, train, held, use_cache=True):
  """(train_f, train_l, eval_f, eval_l) of `encoder`, through model_dir/features when use_cache
  (the key names `checkpoint`; None with use_cache means the random-init encoder)."""
  from nnclr_tf import data, evaluation
  e, size = cfg["eval"], cfg["data"].image_size
  path = feature_cache(cfg, checkpoint) if use_cache else None
  return evaluation.cached_features(path, encoder, data.eval_dataset(train, size, e.batch_size),
                                    data.eval_dataset(held, size, e.batch_size))


def random_init_features(cfg, train, held):
  """Features of the architecture at random initialisation (seed + 1, local BN), cached: the
  baseline of knn_top1_random_init and linear_top1_random_init."""
  import keras
  from nnclr_tf.backbones import build_backbone
  size = cfg["data"].image_size
  keras.utils.set_random_seed(cfg["train"].seed + 1)
  fresh = build_backbone(cfg["model"].backbone, (size, size, 3), False, cfg["model"].width)
  return eval_features(cfg, fresh, None, train, held)


def curve_logger(t, train, strategy):
  from nnclr_tf import data, distributed, monitors
  spe = max(1, data.steps_per_epoch(len(train), t.batch_size))
  return monitors.CurveLogger(os.path.join(distributed.worker_dir(t.model_dir, strategy),
                                           "curves.csv"), max(1, spe // 10))


def write_plots(cfg, model, train, held, step, checkpoint=None):
  from nnclr_tf import plots
  t = cfg["train"]
  # Backbone features from the cache shared with kNN and linear_eval (z is recomputed from them).
  features = None
  if checkpoint and held is not None:
    features = eval_features(cfg, model.encoder, checkpoint, train, held)
  return plots.make_plots(model, train, held, cfg["data"].image_size,
                          os.path.join(t.model_dir, "plots"),
                          curves_csv=os.path.join(t.model_dir, "curves.csv"),
                          tb_logdir=os.path.join(t.model_dir, "logs", "plots"), step=step,
                          batch_size=cfg["eval"].batch_size, seed=t.seed,
                          max_tsne_points=F.plot_tsne_points, features=features)


def restored_model(cfg, strategy):
  """(model, checkpoint path) of the latest checkpoint in --model_dir."""
  import tensorflow as tf
  t = cfg["train"]
  latest = tf.train.latest_checkpoint(t.model_dir)
  if not latest:
    raise UsageError(f"--model_dir={t.model_dir} holds no checkpoint; run --mode=pretrain first")
  model = build_model(cfg, strategy)
  tf.train.Checkpoint(model=model).restore(latest).expect_partial()
  return model, latest


def labelled_splits(cfg, mode):
  """(train, held, num_classes) for a supervised evaluation; UsageError when labels are missing."""
  from nnclr_tf import data
  train, held = data.load_sources(cfg["data"], cfg["train"].seed)
  if not train.has_labels:
    raise UsageError(f"--mode={mode} needs labelled training images (class sub-folders or a "
                     "labelled dataset)")
  if held is None or not held.has_labels:
    raise UsageError(f"--mode={mode} needs a labelled eval split: set --val_images=N, "
                     "--eval_split or --eval_image_dir")
  num_classes = len(train.class_names) or int(max(train.labels.max(), held.labels.max())) + 1
  return train, held, num_classes


def run_linear_eval(cfg, strategy):
  from nnclr_tf import linear_probe, training
  t, size = cfg["train"], cfg["data"].image_size
  train, held, num_classes = labelled_splits(cfg, "linear_eval")
  model, latest = restored_model(cfg, strategy)
  try:
    l2 = [float(v) for v in F.linear_l2]
  except ValueError:
    l2 = []
  if not l2 or min(l2) <= 0:
    raise UsageError(f"--linear_l2={','.join(F.linear_l2)}: give positive numbers, e.g. 1e-4,1e-3")
  cache = feature_cache(cfg, latest)
  train_f, train_l, eval_f, eval_l = eval_features(cfg, model.encoder, latest, train, held)
  probe, info = linear_probe.fit_probe(train_f, train_l, num_classes, train.class_names, size,
                                       l2=l2, seed=t.seed)
  scores = linear_probe.evaluate_probe(probe, eval_f, eval_l)
  probe_path = linear_probe.save_probe(os.path.join(t.model_dir, "linear_probe", "probe.npz"),
                                       probe)
  results = {"linear_top1": scores["top1"], "linear_top5": scores["top5"], **info,
             "eval_examples": int(len(eval_l)), "feature_dim": int(train_f.shape[1]),
             "probe": probe_path, "feature_cache": cache, "checkpoint": latest}
  if F.linear_random_init:
    rf = random_init_features(cfg, train, held)  # the encoder of knn_top1_random_init
    rand, rand_info = linear_probe.fit_probe(rf[0], rf[1], num_classes, l2=l2, seed=t.seed)
    rand_scores = linear_probe.evaluate_probe(rand, rf[2], rf[3])
    results.update(linear_top1_random_init=rand_scores["top1"],
                   linear_top5_random_init=rand_scores["top5"], l2_random_init=rand_info["l2"])
  from nnclr_tf import export
  ex = cfg["export"]
  results["classifier_export_dir"] = export.export_classifier(
      model, probe_path, ex.base, ex.version, ex.warmup,
      metadata=export_metadata(t.model_dir, checkpoint_step(latest)))
  training.write_json(os.path.join(t.model_dir, "linear_eval_results.json"), results)
  return results


def run_finetune(cfg, strategy):
  import json
  from nnclr_tf import finetune, training
  t = cfg["train"]
  train, held, num_classes = labelled_splits(cfg, "finetune")
  if F.finetune_init == "random":
    model, latest = build_model(cfg, strategy), None
  else:
    model, latest = restored_model(cfg, strategy)
  results = finetune.finetune(
      model.encoder, train, held, num_classes, cfg["data"].image_size, cfg["augment"],
      label_fraction=F.label_fraction, epochs=F.finetune_epochs,
      batch_size=F.finetune_batch_size, learning_rate=F.finetune_lr, seed=t.seed,
      strategy=strategy, eval_batch_size=cfg["eval"].batch_size, verbose=F.verbose)
  results.update(init=F.finetune_init, checkpoint=latest)
  # The latest run at the top level; every (fraction, init) run kept under by_label_fraction.
  path = os.path.join(t.model_dir, "finetune_results.json")
  runs = {}
  if os.path.exists(path):
    with open(path) as f:
      runs = json.load(f).get("by_label_fraction", {})
  key = f"{F.label_fraction:g}" + ("" if F.finetune_init == "pretrained" else "_random_init")
  runs[key] = dict(results)
  training.write_json(path, {**results, "by_label_fraction": runs})
  return results


def run_plots(cfg, strategy):
  from nnclr_tf import data
  model, latest = restored_model(cfg, strategy)
  train, held = data.load_sources(cfg["data"], cfg["train"].seed)
  step = int(latest.rsplit("-", 1)[-1]) if latest.rsplit("-", 1)[-1].isdigit() else 0
  return {"plots": write_plots(cfg, model, train, held, step, latest), "checkpoint": latest}


# Export for TF Serving (issue 5)
EXPORTING_MODES = ("pretrain", "linear_eval", "export")


def check_export_flags(e):
  """Refuses an unwritable --export_base or an existing --export_version before any work."""
  import tempfile
  from nnclr_tf import export
  if F.export_base:
    try:
      os.makedirs(e.base, exist_ok=True)
      probe = tempfile.mkdtemp(prefix=".write_test-", dir=e.base)
      os.rmdir(probe)
    except OSError as err:
      raise UsageError(f"--export_base={e.base} is not writable ({err.strerror}); choose another")
  if not e.version:
    return
  for name in (export.ENCODER, export.CLASSIFIER):
    path = export.version_path(e.base, name, e.version)
    if os.path.exists(path):
      nxt = max(export.next_version(os.path.join(e.base, n))
                for n in (export.ENCODER, export.CLASSIFIER))
      raise UsageError(f"--export_version={e.version}: {path} already exists and a served version "
                       f"is never overwritten; omit --export_version (next free: {nxt}) or choose "
                       "another --export_base")


def run_export(cfg, strategy):
  """Encoder (and, when linear_eval has written its probe, classifier) SavedModels of the latest
  checkpoint, in TF Serving's layout."""
  import tensorflow as tf
  from nnclr_tf import export, training
  t, e = cfg["train"], cfg["export"]
  latest = tf.train.latest_checkpoint(t.model_dir)
  if not latest:
    raise UsageError(f"--model_dir={t.model_dir} holds no checkpoint; run --mode=pretrain first")
  model = build_model(cfg, strategy)
  prepare_model_dir(t.model_dir, model.get_config())
  status = tf.train.Checkpoint(model=model).restore(latest)
  status.assert_existing_objects_matched().expect_partial()  # the optimizer is not needed
  meta = export_metadata(t.model_dir, checkpoint_step(latest))
  out = {"encoder": export.export_encoder(model, e.base, e.version, e.warmup, metadata=meta)}
  probe = os.path.join(t.model_dir, export.PROBE_FILE)
  if os.path.exists(probe):
    out["classifier"] = export.export_classifier(model, probe, e.base, e.version, e.warmup,
                                                 metadata=meta)
  else:
    logging.warning("no linear probe at %s: classifier not exported (run --mode=linear_eval)",
                    probe)
  results = {"checkpoint": latest}
  for name, path in out.items():
    results[f"{name}_export_dir"] = path
    results[f"{name}_export_bytes"] = export.dir_size(path)
  training.write_json(os.path.join(t.model_dir, "export_results.json"), results)
  return results


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; flags look like --name=value")
  cfg = configs()
  if F.mode in EXPORTING_MODES:
    check_export_flags(cfg["export"])
  import tensorflow as tf
  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING if F.verbose < 2 else logging.INFO)
  from nnclr_tf import distributed
  distributed.split_cpu(F.cpu_replicas)
  import json
  import keras
  if F.deterministic:
    tf.config.experimental.enable_op_determinism()
  if F.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
        {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[F.mixed_precision])
  strategy = distributed.make_strategy(F.strategy, F.cpu_replicas, F.tpu)
  logging.info("strategy %s with %d replicas", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  results = {"pretrain": run_pretrain, "knn_eval": run_knn_eval, "linear_eval": run_linear_eval,
             "finetune": run_finetune, "plots": run_plots,
             "export": run_export}[F.mode](cfg, strategy)
  print(json.dumps(results, sort_keys=True))


def run_main(argv):
  from nnclr_tf.data import DataError
  from nnclr_tf.export import ExportError
  from nnclr_tf.training import ConfigError, NonFiniteLossError
  try:
    main(argv)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except (UsageError, DataError, ConfigError, ExportError, FileExistsError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def parse_flags(argv):
  """absl's parser, with two changes: the command line beats every --flagfile whatever the order
  (see flagfiles_first), and a mistyped flag (on the command line or in a --flagfile) is one line
  and exit code 2 instead of absl's usage text and exit code 1."""
  argv = flagfiles_first(argv)
  try:
    return F(argv)
  except flags.Error as e:
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


FLAGFILE_FORMS = ("--flagfile", "-flagfile")


def flagfiles_first(argv):
  """argv with the command line's --flagfile arguments moved, in their order, in front of every
  other flag. absl expands a flagfile in place and the last value of a flag wins, so
  `--mode=linear_eval --flagfile=preset` would otherwise run the preset's --mode=pretrain. Takes
  --flagfile=x, --flagfile x, -flagfile=x and -flagfile x; nothing after `--` moves."""
  program, rest = argv[:1], list(argv[1:])
  files, others = [], []
  while rest:
    arg = rest.pop(0)
    if arg == "--":
      others += [arg, *rest]
      break
    if arg in FLAGFILE_FORMS:
      # A bare --flagfile at the end stays so absl reports the missing file name.
      files += [arg, rest.pop(0)] if rest else [arg]
    elif arg.startswith(tuple(f + "=" for f in FLAGFILE_FORMS)):
      files.append(arg)
    else:
      others.append(arg)
  return program + files + others


def _flagfile_paths(argv):
  paths, args = [], iter(argv[1:])
  for arg in args:
    if arg in FLAGFILE_FORMS:
      paths.append(next(args, ""))
    elif arg.startswith(tuple(f + "=" for f in FLAGFILE_FORMS)):
      paths.append(arg.split("=", 1)[1])
  return paths


def _flag_error(e, argv):
  message = " ".join(str(e).split())
  name = getattr(e, "flagname", None)
  if isinstance(e, flags.UnrecognizedFlagError) and name:
    where = ""
    for path in _flagfile_paths(argv):
      try:
        with open(path) as f:
          if any(line.strip().lstrip("-").split("=")[0] in (name, "no" + name) for line in f):
            where = f" in --flagfile={path}"
      except OSError:
        pass
    suggestions = message.split("Did you mean:", 1)
    hint = f"did you mean --{suggestions[1].strip().rstrip('?').strip()}? " if len(
        suggestions) > 1 else ""
    return f"unknown flag --{name}{where}; {hint}see python run.py --helpfull"
  if isinstance(e, flags.CantOpenFlagFileError):
    return f"--flagfile: cannot open {message.split('flagfile: ', 1)[-1]}; check the path"
  return f"{message}; see python run.py --helpfull"


if __name__ == "__main__":
  app.run(run_main, flags_parser=parse_flags)
