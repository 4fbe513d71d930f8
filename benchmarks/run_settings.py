"""A benchmark's run settings: the Experiment of the preset it is measured on, with the command
line's overrides by flag name.

The run flags a script accepts are generated from the schema (`nnclr_tf.config.FLAG_SPECS`):
their types, choices, help and old names are the CLI's, and each one left out keeps the preset's
value. A script's own options (steps, rounds, output paths...) are added to the same parser as
usual:

  ap = run_settings.Parser("cifar10_resnet18", run_settings.STEP_FLAGS, description=...)
  ap.add_argument("--steps", type=int, default=10)
  args, exp = ap.parse(argv)          # args: the script's options; exp: a validated Experiment

Light on purpose (argparse and nnclr_tf.config, no TensorFlow, no environment changes), so that a
script that only starts subprocesses can read its settings without setting up TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from nnclr_tf import config  # noqa: E402
from nnclr_tf.errors import ConfigError  # noqa: E402


def flag_names(sections=(), flags=(), exclude=()):
  """The names of the Experiment flags of `sections`, plus `flags`, minus `exclude`, in the
  schema's order."""
  return tuple(name for name, spec in config.FLAG_SPECS.items()
               if (spec.section in sections or name in flags) and name not in exclude)


# What a train step depends on: the model, the support set, the loss, the optimizer and the
# runtime, at the image size, global batch and seed of the run.
STEP_FLAGS = flag_names(("model", "support", "loss", "optim", "runtime"),
                        ("image_size", "batch_size", "seed", "jit_compile"))


def str2bool(v):
  if isinstance(v, bool):
    return v
  if v.lower() in ("1", "true", "yes", "y"):
    return True
  if v.lower() in ("0", "false", "no", "n"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def comma_list(v):
  """absl's list flags: comma-separated strings (the schema's `parse` makes them numbers)."""
  return [x for x in v.split(",") if x.strip()]


def as_cli(values):
  """["--flag=value", ...] of {flag: value}, as run.py's absl flags read them."""
  def text(v):
    if isinstance(v, bool):
      return "true" if v else "false"
    if isinstance(v, (list, tuple)):
      return ",".join(str(x) for x in v)
    return str(v)
  return [f"--{name}={text(value)}" for name, value in values.items()]


_DEST = "run flag:"  # argparse dest of a run flag; no script option can be named so


class Parser(argparse.ArgumentParser):
  """argparse with the Experiment flags `flags` (names from config.FLAG_SPECS) as options.

  preset: a preset name or flagfile path (the script's default; `--preset` changes it unless
    `preset_option` is False), or a callable (args, {flag: value given}) -> path, for a script
    whose preset depends on its options (budget_eval.py reads a model_dir's flags.txt).
  overrides: {flag: value} where the script deliberately differs from its preset (say why next to
    it), or a callable (args, given) -> that dict; the command line beats them.
  aliases: {flag: ["--old_name", ...]}, a script's older spellings of a run flag.
  required: run flags without which the script cannot run (no preset gives them).
  """

  def __init__(self, preset, flags, overrides=None, aliases=None, required=(), preset_option=True,
               **kwargs):
    kwargs.setdefault("allow_abbrev", False)  # as absl: a flag is named in full
    super().__init__(**kwargs)
    self.preset = preset
    self.run_flags = tuple(flags)
    self.overrides = overrides or {}
    self.given: dict = {}
    unknown = sorted(set(self.run_flags) - set(config.FLAG_SPECS))
    if unknown:
      raise ValueError(f"not Experiment flags: {unknown}")
    shown = None if callable(preset) else config.Experiment.from_flagfile(preset).flag_values()
    if shown is not None and not callable(self.overrides):
      shown.update(self.overrides)  # --help shows what the script runs with
    if shown is not None and preset_option:
      self.add_argument("--preset", default=preset,
                        help="preset name or flagfile the run settings start from "
                             "(default: %(default)s)")
    group = self.add_argument_group(
        "run settings", "nnclr_tf's own flags (run.py --helpfull); each one left out keeps the "
        "preset's value" + (" or the script's override" if self.overrides else "")
        + ("" if shown else " (the run's flags.txt)"))
    for name in self.run_flags:
      self._add_run_flag(group, config.FLAG_SPECS[name], (aliases or {}).get(name, ()),
                         name in required, shown)

  def _add_run_flag(self, group, spec, aliases, required, shown):
    names = [f"--{spec.name}", *(f"--{a}" for a in spec.aliases), *aliases]
    help_text = spec.help.replace("%", "%%")
    if shown is not None:
      help_text += f" [default: {shown[spec.name]}]".replace("%", "%%")
    kw = dict(dest=_DEST + spec.name, default=argparse.SUPPRESS, help=help_text)
    default = spec.flag_default
    if spec.choices is not None:
      group.add_argument(*names, choices=spec.choices, required=required, **kw)
    elif isinstance(default, bool):
      # --flag, --flag=true|false and absl's --noflag.
      group.add_argument(*names, type=str2bool, nargs="?", const=True, metavar="BOOL",
                         required=required, **kw)
      group.add_argument(f"--no{spec.name}", action="store_false", dest=_DEST + spec.name,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
      kind = (int if isinstance(default, int) else float if isinstance(default, float)
              else comma_list if isinstance(default, list) else str)
      group.add_argument(*names, type=kind, metavar=spec.name.upper(), required=required, **kw)

  def option_names(self):
    """Every option string this parser accepts (the docs' checks read it)."""
    return {s for action in self._actions for s in action.option_strings}

  def parse(self, argv=None):
    """(the script's own options, the Experiment): the preset, the script's overrides, then the
    run flags given on the command line (also kept in `self.given`). A setting that cannot work
    is a usage error naming the flag."""
    ns = self.parse_args(argv)
    self.given = {key[len(_DEST):]: value for key, value in vars(ns).items()
                  if key.startswith(_DEST)}
    for key in list(vars(ns)):
      if key.startswith(_DEST):
        delattr(ns, key)
    preset = (self.preset(ns, self.given) if callable(self.preset)
              else getattr(ns, "preset", self.preset))
    overrides = self.overrides(ns, self.given) if callable(self.overrides) else self.overrides
    try:
      exp = config.Experiment.from_flagfile(preset, **{**overrides, **self.given})
    except ConfigError as e:
      self.error(str(e))
    return ns, exp

  def settings(self, args, exp):
    """What a result line records of its settings: the script's options and the value of every
    run flag it accepts."""
    values = exp.flag_values()
    return {**vars(args), **{name: values[name] for name in self.run_flags}}
