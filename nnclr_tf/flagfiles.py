"""absl flag parsing with this project's rules, for any FlagValues: the presets shipped in the
package, the command line beating every --flagfile, and one-line parse errors.

Which flags exist is not known here (config.define_flags defines them); this module sits below
config, which reads presets with it, and below the CLI, which parses the command line with it.

Flag precedence. Anything on the command line beats every --flagfile, whatever the order:
`--mode=linear_eval --flagfile=preset` and `--flagfile=preset --mode=linear_eval` are the same
command. Several --flagfile arguments are read in their command-line order (a later file wins). A
`--flagfile=other` line inside a file is expanded where it stands, and within the files later
lines win, so a file that starts with `--flagfile=preset` and then sets flags overrides the
preset. A flag given twice on the command line takes the last value. Flagfile paths, nested ones
included, are relative to the current directory; `--flagfile=flags/<preset>.cfg` (or just the
preset's name) also finds the presets shipped inside the package, so an installed `nnclr-tf`
works outside the repository.
"""

from __future__ import annotations

import os

from absl import flags

from nnclr_tf import errors

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")


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


# flags.txt (a run's resolved flags, cli.flags_text) begins and ends with these lines, so a
# truncated one is told from a complete one when it is read back as a --flagfile.
RUN_FLAGS_HEADER = ("# flags.txt: the resolved flags of the run that wrote this model_dir; "
                    "`--flagfile=<this file>` runs the same experiment")
RUN_FLAGS_END = "# end of flags.txt"


def check_flagfiles(argv):
  """ConfigError (one line) for a --flagfile on the command line that is damaged: not UTF-8 text
  (absl would raise a bare UnicodeDecodeError), empty (the run would silently take every
  default), or a run's flags.txt without its end line (truncated: the flags after the cut would
  silently take their defaults)."""
  for arg in argv[1:]:
    if not arg.startswith("--flagfile="):
      continue
    path = arg.split("=", 1)[1]
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError:
      continue  # absl names the path it cannot open
    fix = "restore it from a copy, or pass the flags another way"
    try:
      lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
      raise errors.ConfigError(f"--flagfile={path} is damaged (not UTF-8 text); {fix}") from None
    if not raw.strip():
      raise errors.ConfigError(f"--flagfile={path} is empty (damaged?); {fix}")
    ours = len(lines[0]) >= 8 and RUN_FLAGS_HEADER.startswith(lines[0])  # cut inside, too
    if ours and RUN_FLAGS_END not in lines:
      raise errors.ConfigError(
          f"--flagfile={path} is damaged (truncated: its last line, {RUN_FLAGS_END!r}, is "
          f"missing, so the flags after the cut would take their defaults); {fix}")


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


def parse(argv, fv, undefok=()):
  """Parses argv into `fv` with the command line beating the flagfiles; returns the leftovers.
  `undefok`: flag names to ignore (a preset's --mode, read for an Experiment, which has none)."""
  extra = [f"--undefok={','.join(undefok)}"] if undefok else []
  return fv(command_line_first([argv[0], *extra, *argv[1:]]))


# The flags absl itself defines for every program (absl.app, absl.logging and the help flags):
# a hand-made flagfile may copy them from `--helpfull`, and a reader of it may ignore them.
# Written out, not read from the global FLAGS, which only the CLI reads.
ABSL_OWN_FLAGS = ("run_with_pdb", "pdb_post_mortem", "pdb", "run_with_profiling", "profile_file",
                  "use_cprofile_for_profiling", "only_check_args", "logtostderr",
                  "alsologtostderr", "log_dir", "verbosity", "v", "logger_levels",
                  "stderrthreshold", "showprefixforinfo", "help", "helpfull", "helpshort",
                  "helpxml", "only_check_flags")


def read_flagfile(fv, path, undefok=()):
  """Parses the flagfile `path` (a preset name or a file) into `fv`; ConfigError on a mistake."""
  argv = ["nnclr-tf", f"--flagfile={path}"]
  check_flagfiles(command_line_first(argv))
  try:
    parse(argv, fv, undefok)
  except flags.Error as e:
    raise errors.ConfigError(flag_error(e, command_line_first(argv))) from None
  return fv
