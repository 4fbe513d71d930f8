"""nnclr_tf command line: the only module that defines and reads absl flags.

  nnclr-tf --mode=pretrain --flagfile=flags/quickstart.cfg     (or: python run.py ...)
  nnclr-tf --mode=knn_eval --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=linear_eval --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=finetune --label_fraction=0.1 --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=plots --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=export --flagfile=flags/quickstart.cfg

Flags -> `config.Experiment` -> `experiment.<mode>(exp)`; the results JSON is the last line.

Flag precedence. Anything on the command line beats every --flagfile, whatever the order:
`--mode=linear_eval --flagfile=preset` and `--flagfile=preset --mode=linear_eval` are the same
command. Several --flagfile arguments are read in their command-line order (a later file wins). A
`--flagfile=other` line inside a file is expanded where it stands, and within the files later
lines win, so a file that starts with `--flagfile=preset` and then sets flags overrides the
preset. A flag given twice on the command line takes the last value. Flagfile paths, nested ones
included, are relative to the current directory; `--flagfile=flags/<preset>.cfg` (or just the
preset's name) also finds the presets shipped inside the package, so an installed `nnclr-tf`
works outside the repository.

Exit codes: 0 done, 2 a flag/file/data/model_dir mistake, a model_dir in use by another run or a
full disk (one `error:` line says what to change), 3 training diverged (NaN/Inf; the last finite
checkpoint is kept), 143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (one
`stopped:` line). Rerunning resumes.

Output: stdout has Keras's training progress (--verbose), one line or bar per later stage, a
short summary, and the results JSON as the last line. stderr has warnings and errors only: absl
INFO logs need --verbosity=0, and TensorFlow's native start-up lines (CUDA stubs, CPU feature
notes, absl::InitializeLog) are filtered out unless TF_CPP_MIN_LOG_LEVEL is set below 2.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Below 2 the user asked for TensorFlow's native INFO/WARNING lines: then nothing is filtered.
_NATIVE_QUIET = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") >= "2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow leaves its oneDNN CPU kernels off unless the CPU has AVX512-VNNI/BF16 or AMX; without
# them convolutions run on slower Eigen kernels (the ResNet-18 step took ~40% more CPU time,
# benchmarks/RESULTS.md). TF_ENABLE_ONEDNN_OPTS=0 still turns it off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import contextlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from nnclr_tf import errors  # noqa: E402
from nnclr_tf.config import BACKBONES  # noqa: E402

MODES = ("pretrain", "knn_eval", "linear_eval", "finetune", "plots", "export")
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """Defines every flag on `fv` (the global FLAGS, or a private FlagValues for parsing files)."""
  def string(name, default, help_):
    flags.DEFINE_string(name, default, help_, flag_values=fv)

  def integer(name, default, help_):
    flags.DEFINE_integer(name, default, help_, flag_values=fv)

  def real(name, default, help_):
    flags.DEFINE_float(name, default, help_, flag_values=fv)

  def boolean(name, default, help_):
    flags.DEFINE_bool(name, default, help_, flag_values=fv)

  def enum(name, default, choices, help_):
    flags.DEFINE_enum(name, default, choices, help_, flag_values=fv)

  def strings(name, default, help_):
    flags.DEFINE_list(name, default, help_, flag_values=fv)

  enum("mode", "pretrain", MODES, "What to run.")
  string("model_dir", "/tmp/nnclr", "Checkpoints, logs, exports and results go here.")
  # Data
  string("dataset", "digits", "digits | folder | any prepared tfds image dataset name.")
  string("image_dir", None, "--dataset=folder: class sub-folders or a flat folder.")
  string("eval_image_dir", None, "--dataset=folder: held-out images for evaluation.")
  integer("val_images", 0, "Carve a seeded class-balanced held-out set of this size.")
  string("data_dir", None, "tfds data_dir (nothing is downloaded).")
  string("train_split", "train", "tfds split to pretrain on.")
  string("eval_split", "test", "tfds split to evaluate on ('' for none).")
  string("knn_train_split", "", "tfds split of the kNN bank and of linear eval / fine-tune "
         "training ('': --train_split), e.g. STL-10's labelled `train` when pretraining on "
         "train+unlabelled.")
  integer("image_size", 32, "Training resolution (square).")
  real("eval_crop_fraction", 1.0, "Evaluation and serving: resize the shorter side to "
       "image_size / f, centre-crop image_size (ImageNet: 0.875); 1.0 resizes the whole image.")
  integer("cache_limit_mb", 2048, "Hold decoded images in memory up to this size.")
  boolean("skip_bad_images", True, "Leave undecodable image files out (counted in the results as "
          "skipped_images); --noskip_bad_images makes them an error.")
  # Augmentation (BYOL asymmetric pipeline; pairs are view1,view2)
  real("crop_min_scale", 0.08, "Random resized crop: smallest area fraction.")
  real("flip_prob", 0.5, "Horizontal flip probability.")
  real("jitter_prob", 0.8, "Colour jitter probability.")
  real("brightness", 0.4, "Colour jitter brightness strength.")
  real("contrast", 0.4, "Colour jitter contrast strength.")
  real("saturation", 0.2, "Colour jitter saturation strength.")
  real("hue", 0.1, "Colour jitter hue strength.")
  real("grayscale_prob", 0.2, "Grayscale probability.")
  strings("blur_prob", ["1.0", "0.1"], "Gaussian blur probability for view1,view2.")
  strings("solarize_prob", ["0.0", "0.2"], "Solarize probability for view1,view2.")
  # Model
  enum("backbone", "resnet50", list(BACKBONES),
       "Encoder; keras_* are keras.applications ResNets, randomly initialised.")
  integer("width", 64, "Base channel width of the backbone.")
  integer("proj_hidden_dim", 2048, "Projection MLP hidden size.")
  integer("proj_layers", 3, "Projection MLP depth (paper: 3).")
  integer("pred_hidden_dim", 4096, "Prediction MLP hidden size.")
  integer("embedding_dim", 256, "Embedding size d.")
  boolean("global_bn", True, "Synchronise BatchNorm statistics across replicas.")
  boolean("zero_init_residual", True, "Start the last BatchNorm of each residual block at gamma "
          "0, so each block starts as the identity (SimCLR/BYOL); false = PyTorch recipes' 1.")
  # NNCLR
  integer("queue_size", 98304, "Support set size; a multiple of --batch_size.")
  real("temperature", 0.1, "InfoNCE temperature.")
  integer("nn_topk", 1, "Sample the positive uniformly from the top-k neighbours.")
  boolean("use_nn", True, "False: the positive is the other view (SimCLR ablation).")
  boolean("symmetric_loss", False, "Add the paper's column term (softmax over the batch's "
          "neighbours for each prediction) to the row-wise InfoNCE (paper Sec. 3.2).")
  # Optimisation
  integer("batch_size", 4096, "Global batch size (all replicas and workers).")
  integer("train_epochs", 1000, "Epochs to train.")
  integer("train_steps", 0, "If > 0, overrides --train_epochs.")
  enum("optimizer", "lars", ["lars", "sgd", "adamw"], "Optimizer.")
  real("learning_rate", 0.3, "Base learning rate (scaled by --lr_scaling).")
  enum("lr_scaling", "linear", ["linear", "sqrt", "none"], "x B/256, x sqrt(B/256).")
  real("weight_decay", 1e-6, "Weight decay (LARS, decoupled SGD, AdamW: biases and BN excluded).")
  enum("weight_decay_mode", "decoupled", ["decoupled", "coupled"], "SGD: decoupled (w -= lr*wd*w, "
       "biases/BN excluded) or coupled (PyTorch SGD: wd*w added to every gradient, through "
       "momentum).")
  real("momentum", 0.9, "Momentum (LARS, SGD).")
  real("lars_eta", 0.001, "LARS trust coefficient.")
  boolean("lars_clip_lr", False, "LARS clip mode (NVIDIA LARC, solo-learn): per-layer rate "
          "min(eta*||w||/(||g||+wd*||w||), lr).")
  real("warmup_epochs", 10, "Linear warm-up length in epochs.")
  integer("seed", 0, "Seed for weights, data order and augmentation.")
  # Runtime
  enum("strategy", "auto", ["auto", "mirrored", "multi_worker", "tpu", "one_device"],
       "Distribution strategy.")
  integer("cpu_replicas", 1, "Split the CPU into N logical devices (Mirrored tests).")
  string("tpu", None, "TPU name or address for --strategy=tpu.")
  boolean("jit_compile", False, "Compile the train step with XLA.")
  enum("mixed_precision", "none", ["none", "bf16", "fp16"], "Compute dtype.")
  integer("checkpoint_every_steps", 0, "Also checkpoint every N steps (0: epochs only).")
  integer("keep_checkpoints", 3, "How many checkpoints to keep.")
  integer("verbose", 1, "Keras progress: 0 silent, 1 bar, 2 one line per epoch.")
  boolean("deterministic", False, "TF op determinism: with --seed, reruns give identical losses "
          "and weights (no measurable cost on CPU; may be slower on GPU).")
  # Evaluation
  integer("knn_k", 200, "kNN neighbours.")
  real("knn_temperature", 0.1, "kNN vote temperature.")
  integer("eval_batch_size", 256, "Batch size for feature extraction.")
  boolean("online_probe", True, "Train an online linear probe on stop-gradient backbone features "
          "during pretraining (only when the training data is labelled).")
  real("online_probe_lr", 1e-2, "Adam learning rate of the online probe.")
  strings("linear_l2", ["1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
          "L2 strengths of the linear probe; several: chosen on 10% of the train features.")
  boolean("random_init_baseline", True, "kNN and linear_eval also score the architecture at "
          "random initialisation (knn_top1_random_init, linear_top1_random_init): one more "
          "forward pass over the train and eval splits.")
  real("label_fraction", 0.1, "--mode=finetune: class-balanced labelled fraction.")
  integer("finetune_epochs", 0, "Fine-tune epochs (0: SimCLR's 60 for <=1% labels, else 30, but "
          "at least 300 steps).")
  integer("finetune_batch_size", 256, "Fine-tune global batch (capped at the subset).")
  real("finetune_lr", 0.05, "Fine-tune base lr, x batch/256 (SimCLR: 0.05).")
  enum("finetune_init", "pretrained", ["pretrained", "random"],
       "Fine-tune the pretrained encoder, or train from scratch (the baseline).")
  boolean("plots", True, "--mode=pretrain: write the plots into model_dir/plots at the end.")
  integer("plot_tsne_points", 2000, "At most this many points in the t-SNE map.")
  # Export for TF Serving: <export_base>/<encoder|classifier>/<version>/
  string("export_base", None, "TF Serving model base path (default <model_dir>/export).")
  integer("export_version", 0, "Version to write; 0: one past the newest. An existing version "
          "is never overwritten.")
  from nnclr_tf.config import FLAG_ALIASES
  for old, new in FLAG_ALIASES.items():
    flags.DEFINE_alias(old, new, flag_values=fv)


define_flags()


# --- parsing -----------------------------------------------------------------------------------

def _is_flagfile(arg):
  return arg.lstrip("-").split("=", 1)[0] == "flagfile" and arg.startswith("-")


def resolve_preset(path):
  """`path` if it exists, else the preset shipped with the package that it names
  (`flags/quickstart.cfg`, `quickstart.cfg` or `quickstart`), else `path` unchanged."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path)
  name = name if name.endswith(".cfg") else name + ".cfg"
  packaged = os.path.join(PRESETS_DIR, name)
  return packaged if os.path.exists(packaged) else path


def presets():
  """Names of the presets shipped with the package."""
  return sorted(f[:-4] for f in os.listdir(PRESETS_DIR) if f.endswith(".cfg"))


def command_line_first(argv):
  """argv reordered so that every --flagfile comes before the other flags (absl expands a
  flagfile in place and the later value wins, so a preset's own --mode=pretrain would otherwise
  beat a --mode given before it). Flagfile paths resolve to the packaged presets when needed."""
  files, rest = [], []
  args = list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      rest.extend(args[i:])
      break
    if _is_flagfile(arg):
      if "=" in arg:
        value = arg.split("=", 1)[1]
      elif i + 1 < len(args):
        i += 1
        value = args[i]
      else:
        rest.append(arg)  # absl reports the missing value
        i += 1
        continue
      files.append("--flagfile=" + resolve_preset(value))
    else:
      rest.append(arg)
    i += 1
  return [argv[0], *files, *rest]


def parse(argv, fv=FLAGS):
  """Parses argv into `fv` with the command line beating the flagfiles; returns the leftovers."""
  return fv(command_line_first(argv))


def flagfile_values(path, fv=None):
  """{flag name: value} of every Experiment flag after reading the flagfile `path` (a private
  FlagValues: the global flags are untouched)."""
  from nnclr_tf.config import FLAG_FIELDS
  if fv is None:
    fv = flags.FlagValues()
    define_flags(fv)
  try:
    parse(["nnclr-tf", f"--flagfile={path}"], fv)
  except flags.Error as e:
    raise errors.ConfigError(flag_error(e, ["nnclr-tf", f"--flagfile={path}"])) from None
  return {name: fv[name].value for name in FLAG_FIELDS}


def experiment_from_flags(fv=FLAGS):
  from nnclr_tf.config import FLAG_FIELDS, Experiment
  return Experiment.from_flags({name: fv[name].value for name in FLAG_FIELDS})


def flag_error(e, argv):
  """One line for absl's parse error: the flag, where it was (a --flagfile) and a suggestion."""
  message = " ".join(str(e).split())
  name = getattr(e, "flagname", None)
  if isinstance(e, flags.UnrecognizedFlagError) and name:
    where = ""
    for arg in argv[1:]:
      if arg.startswith("--flagfile="):
        path = arg.split("=", 1)[1]
        try:
          with open(path) as f:
            if any(line.strip().lstrip("-").split("=")[0] in (name, "no" + name) for line in f):
              where = f" in --flagfile={path}"
        except OSError:
          pass
    suggestions = message.split("Did you mean:", 1)
    hint = f"did you mean --{suggestions[1].strip().rstrip('?').strip()}? " if len(
        suggestions) > 1 else ""
    return f"unknown flag --{name}{where}; {hint}see nnclr-tf --helpfull"
  if isinstance(e, flags.CantOpenFlagFileError):
    return f"--flagfile: cannot open {message.split('flagfile: ', 1)[-1]}; check the path"
  return f"{message}; see nnclr-tf --helpfull"


def parse_flags(argv):
  """absl's flags parser for app.run, with the command line beating the flagfiles; a mistyped
  flag (on the command line or in a --flagfile) is one line and exit code 2 instead of absl's
  usage text and exit code 1."""
  reordered = command_line_first(argv)
  try:
    return FLAGS(reordered)
  except flags.Error as e:
    print(f"error: {flag_error(e, reordered)}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)


# --- running -----------------------------------------------------------------------------------

# TensorFlow's native start-up lines on a machine without a GPU, and notes about CPU instructions:
# they say nothing a user can act on. Errors and anything unknown pass through.
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc.*cuInit|"
    r"cpu_feature_guard\.cc|^To enable the following instructions|rebuild TensorFlow with the "
    r"appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|computation placer "
    r"already registered|oneDNN custom operations are on|TF-TRT Warning")


@contextlib.contextmanager
def native_start_up_filtered():
  """Runs the block (TensorFlow's import and device set-up) with file descriptor 2 captured, then
  writes the captured lines back to stderr less NATIVE_NOISE. TensorFlow's C++ logs before absl's
  InitializeLog ignore TF_CPP_MIN_LOG_LEVEL, so only the descriptor can catch them. Everything is
  replayed unfiltered when the block raises."""
  if not _NATIVE_QUIET:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode(errors="replace").splitlines(keepends=True)
      kept = lines if failed else [line for line in lines if not NATIVE_NOISE.search(line)]
      sys.stderr.write("".join(kept))
      sys.stderr.flush()


def quiet_logs():
  """absl at WARNING unless --verbosity was given; warnings as `warning: <message>` lines (absl's
  own format, with time, thread and file, when --verbosity is given for debugging)."""
  import logging as py_logging
  if FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)

  class Plain(py_logging.Formatter):
    def format(self, record):
      return f"{record.levelname.lower()}: {record.getMessage()}"

  logging.get_absl_handler().setFormatter(Plain())


def _fmt(value, digits=3):
  return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else value


def summary(mode, exp, results):
  """A few human-readable lines of a mode's results (the JSON line follows)."""
  r, d = results, exp.train.model_dir
  lines = []
  if mode == "pretrain":
    lines.append(f"pretrained {d} to step {r.get('steps')} ({_fmt(r.get('epochs'), 2)} epochs"
                 + (f", resumed from step {r['resumed_from_step']}" if r.get("resumed_from_step")
                    else "") + ")")
    lines.append(f"  final loss {_fmt(r.get('final_loss'))} (mean of the last epoch), NN "
                 f"label-hit {_fmt(r.get('nn_label_hit'))}, "
                 f"{_fmt(r.get('pairs_per_sec'), 1)} pairs/s")
  if r.get("knn_top1") is not None:
    base = (f" (random init {_fmt(r['knn_top1_random_init'])})"
            if r.get("knn_top1_random_init") is not None else "")
    lines.append(f"  kNN top-1 {_fmt(r['knn_top1'])}{base}, k={r.get('knn_k')}, "
                 f"{r.get('eval_examples')} eval images")
  if r.get("linear_top1") is not None:
    base = (f" (random init {_fmt(r['linear_top1_random_init'])})"
            if r.get("linear_top1_random_init") is not None else "")
    lines.append(f"linear probe top-1 {_fmt(r['linear_top1'])}{base}, l2={r.get('l2')}")
  if mode == "finetune" and r.get("top1") is not None:
    lines.append(f"fine-tuned top-1 {_fmt(r['top1'])} ({r.get('init')}, "
                 f"label fraction {exp.finetune.label_fraction:g})")
  for key in ("export_dir", "encoder_export_dir", "classifier_export_dir"):
    if r.get(key):
      lines.append(f"  export: {r[key]}")
  if r.get("plots"):
    lines.append(f"  plots: {os.path.dirname(next(iter(r['plots'].values())))}/")
  if r.get("checkpoint"):
    lines.append(f"  checkpoint: {r['checkpoint']}")
  from nnclr_tf import model_dir as md
  if mode in md.RESULTS:
    lines.append(f"  results: {md.results_path(d, mode)}")
  return "\n".join(lines)


def main(argv):
  import json
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {' '.join(argv[1:])}; flags look like "
                             "--name=value")
  quiet_logs()
  from nnclr_tf import experiment, progress
  from nnclr_tf import model_dir as md
  exp = experiment_from_flags()
  progress.set_verbose(FLAGS.verbose)
  # Before TensorFlow is imported: a second run on the same model_dir stops within a second.
  with md.lock(exp.train.model_dir, FLAGS.mode):
    with native_start_up_filtered():
      if FLAGS.mode in experiment.EXPORTING_MODES:
        experiment.check_export_target(exp, explicit_base=bool(FLAGS.export_base))
      import tensorflow as tf
      tf.get_logger().setLevel("ERROR")
      strategy = experiment.setup(exp)
    run = experiment.MODES[FLAGS.mode]
    if FLAGS.mode == "pretrain":
      results = run(exp, strategy, flags_text=FLAGS.flags_into_string())
    else:
      results = run(exp, strategy)
  if FLAGS.verbose:
    print(summary(FLAGS.mode, exp, results))
  print(json.dumps(results, sort_keys=True))


def run_main(argv):
  """main, with every user-facing error as one `error:` line and its exit code."""
  try:
    main(argv)
  except errors.NNCLRError as e:
    print(f"{e.prefix}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    # Ctrl-C outside training (data loading, evaluation, export): nothing half-written is kept.
    print("stopped: interrupted (SIGINT); the same command resumes from the last checkpoint",
          file=sys.stderr)
    sys.exit(errors.EXIT_SIGINT)
  except Exception as e:  # noqa: BLE001  (only disk-full is ours; everything else re-raised)
    if "tensorflow" in sys.modules:
      from nnclr_tf.training import is_disk_full
      full = is_disk_full(e)
    else:
      import errno
      full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if full:
      from nnclr_tf.training import disk_full_message
      print(f"error: {disk_full_message(e, FLAGS.model_dir)}", file=sys.stderr)
      sys.exit(errors.EXIT_USAGE)
    if isinstance(e, (FileExistsError, RuntimeError)):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(errors.EXIT_USAGE)
    raise


def run():
  """The `nnclr-tf` console script (and run.py)."""
  app.run(run_main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
