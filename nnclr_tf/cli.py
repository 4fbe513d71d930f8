"""nnclr_tf command line: the only module that defines and reads absl flags.

  nnclr-tf --mode=pretrain --flagfile=flags/quickstart.cfg     (or: python run.py ...)
  nnclr-tf --mode=knn_eval --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=linear_eval --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=finetune --label_fraction=0.1 --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=plots --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=export --flagfile=flags/quickstart.cfg
  nnclr-tf --mode=continuous_eval --flagfile=flags/quickstart.cfg   (beside a running pretrain)

Flags -> `config.Experiment` -> `experiment.<mode>(exp)`; the results JSON is the last line.

Flag precedence and the presets: nnclr_tf/flagfiles.py.

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
import json  # noqa: E402
import logging as py_logging  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from nnclr_tf import config, errors, flagfiles  # noqa: E402
from nnclr_tf import model_dir as md  # noqa: E402

MODES = ("pretrain", "knn_eval", "linear_eval", "finetune", "plots", "export", "continuous_eval")

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """Defines --mode and every Experiment flag (generated from config's fields) on `fv`."""
  flags.DEFINE_enum("mode", "pretrain", MODES, "What to run.", flag_values=fv)
  config.define_flags(fv)


define_flags()


# --- parsing -----------------------------------------------------------------------------------

def flags_text(fv=FLAGS):
  """flags.txt: --mode and every Experiment flag, resolved, one per line. Not
  fv.flags_into_string(), which also lists every flag any imported module defined (absl's,
  TensorFlow's test flags), so the file would not read back as a --flagfile."""
  lines = [fv[name].serialize() for name in ("mode", *config.FLAG_SPECS)]
  return "\n".join([flagfiles.RUN_FLAGS_HEADER, *lines, flagfiles.RUN_FLAGS_END]) + "\n"


def experiment_from_flags(fv=FLAGS):
  return config.Experiment.from_flags({name: fv[name].value for name in config.FLAG_SPECS})


def parse_flags(argv):
  """absl's flags parser for app.run, with the command line beating the flagfiles; a mistyped
  flag (on the command line or in a --flagfile) is one line and exit code 2 instead of absl's
  usage text and exit code 1."""
  reordered = flagfiles.command_line_first(argv)
  try:
    flagfiles.check_flagfiles(reordered)
  except errors.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  try:
    return FLAGS(reordered)
  except flags.Error as e:
    print(f"error: {flagfiles.flag_error(e, reordered)}", file=sys.stderr)
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
  """A few human-readable lines of a mode's results (the JSON line follows); each mode reads only
  the keys its results declare (nnclr_tf/results.py)."""
  r, d = results, exp.train.model_dir
  lines = []
  if mode == "pretrain":
    lines.append(f"pretrained {d} to step {r.get('steps')} ({_fmt(r.get('epochs'), 2)} epochs"
                 + (f", resumed from step {r['resumed_from_step']}" if r.get("resumed_from_step")
                    else "") + ")")
    lines.append(f"  final loss {_fmt(r.get('final_loss'))} (mean of the last epoch), NN "
                 f"label-hit {_fmt(r.get('nn_label_hit'))}, "
                 f"{_fmt(r.get('pairs_per_sec'), 1)} pairs/s")
    if r.get("knn_curve"):
      points = ", ".join(f"{p['knn_top1']:.3f} @ {p['step']}" for p in r["knn_curve"][-4:])
      lines.append(f"  kNN while pretraining: {points}; {_fmt(r.get('knn_monitor_seconds'), 1)} "
                   "s this run, not in pairs/s")
  if mode in ("pretrain", "knn_eval") and r.get("knn_top1") is not None:
    base = (f" (random init {_fmt(r['knn_top1_random_init'])})"
            if r.get("knn_top1_random_init") is not None else "")
    lines.append(f"  kNN top-1 {_fmt(r['knn_top1'])}{base}, k={r.get('knn_k')}, "
                 f"{r.get('eval_examples')} eval images")
  if mode == "linear_eval" and r.get("linear_top1") is not None:
    base = (f" (random init {_fmt(r['linear_top1_random_init'])})"
            if r.get("linear_top1_random_init") is not None else "")
    how = (f"SGD, {r.get('epochs')} epochs" + (f", resumed from step {r['resumed_from_step']}"
                                                 if r.get("resumed_from_step") else "")
           if r.get("protocol") == "sgd" else f"l2={r.get('l2')}")
    lines.append(f"linear probe top-1 {_fmt(r['linear_top1'])}{base}, {how}")
  if mode == "finetune" and r.get("finetune_top1") is not None:
    lines.append(f"fine-tuned top-1 {_fmt(r['finetune_top1'])} ({r.get('init')}, "
                 f"label fraction {exp.finetune.label_fraction:g})")
  if mode == "continuous_eval":
    lines.append(f"continuous_eval of {d}: {len(r.get('scored_steps', []))} checkpoint(s) scored, "
                 f"last step {r.get('last_step')}, kNN top-1 {_fmt(r.get('knn_top1'))}"
                 + (" (stopped by --eval_timeout)" if r.get("timed_out") else ""))
    lines.append(f"  results: {r.get('results_file')}")
  exports = {"pretrain": ("export_dir",), "linear_eval": ("classifier_export_dir",),
             "export": ("encoder_export_dir", "classifier_export_dir")}.get(mode, ())
  for key in exports:
    if r.get(key):
      lines.append(f"  export: {r[key]}")
  if mode in ("pretrain", "plots") and r.get("plots"):
    lines.append(f"  plots: {os.path.dirname(next(iter(r['plots'].values())))}/")
  if mode != "pretrain" and r.get("checkpoint"):
    lines.append(f"  checkpoint: {r['checkpoint']}")
  if mode in md.RESULTS:
    lines.append(f"  results: {md.results_path(d, mode)}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {' '.join(argv[1:])}; flags look like "
                             "--name=value")
  quiet_logs()
  exp = experiment_from_flags()
  # Before TensorFlow is imported: a second run on the same model_dir stops within a second.
  with md.lock(exp.train.model_dir, FLAGS.mode):
    with native_start_up_filtered():
      # The one deferred import of the package: experiment imports TensorFlow, which must come
      # after the lock (above) and inside the filter of its native start-up lines.
      from nnclr_tf import experiment, progress
      progress.set_verbose(FLAGS.verbose)
      if FLAGS.mode in experiment.EXPORTING_MODES:
        experiment.check_export_target(exp, explicit_base=bool(FLAGS.export_base))
      experiment.quiet_tensorflow()
      strategy = experiment.setup(exp)
    run = experiment.MODES[FLAGS.mode]
    if FLAGS.mode == "pretrain":
      results = run(exp, strategy, flags_text=flags_text())
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
    if errors.is_disk_full(e):
      print(f"error: {errors.disk_full_message(e, FLAGS.model_dir)}", file=sys.stderr)
      sys.exit(errors.EXIT_USAGE)
    raise


def run():
  """The `nnclr-tf` console script (and run.py)."""
  app.run(run_main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
