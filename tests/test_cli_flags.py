"""Flag precedence of run.py, by parsing only (nothing is trained): the command line beats every
--flagfile whatever the order, nested flagfiles expand in place with later lines winning, and a
flag repeated on the command line takes its last value."""

import glob
import os
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO
from nnclr_tf import cli, flagfiles

PRESETS = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))


@pytest.fixture
def parse():
  """Parses argv (without the program name) with run.parse_flags; returns the parsed FlagValues.
  Flags are reset before and after so tests cannot leak values into each other."""

  def call(*args):
    cli.FLAGS.unparse_flags()
    cli.parse_flags(["run.py", *args])
    return cli.FLAGS

  yield call
  cli.FLAGS.unparse_flags()


def preset_flag_names(path):
  """Names of the flags a preset sets, read from its text (not through absl, which is under
  test)."""
  names = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("--"):
        names.append(line[2:].split("=", 1)[0])
  return names


def override(flag):
  """(command-line argument, expected parsed value) for a value different from flag.value."""
  value = flag.value
  if isinstance(flag, flags.BooleanFlag):
    return f"--{flag.name}={'false' if value else 'true'}", not value
  if isinstance(flag.parser, flags.EnumParser):
    other = next(v for v in flag.parser.enum_values if v != value)
    return f"--{flag.name}={other}", other
  if isinstance(flag.parser, flags.IntegerParser):
    return f"--{flag.name}={value + 7}", value + 7
  if isinstance(flag.parser, flags.FloatParser):
    return f"--{flag.name}={value + 0.25}", value + 0.25
  if isinstance(flag.parser, flags.ListParser):
    other = [*value, "0.5"]
    return f"--{flag.name}={','.join(other)}", other
  other = f"{value or ''}_override"
  return f"--{flag.name}={other}", other


def test_presets_set_what_their_text_says(parse):
  """Guards the test below: every preset line must really reach its flag, otherwise an override
  "winning" would prove nothing."""
  for path in PRESETS:
    names = preset_flag_names(path)
    assert len(names) >= 20, path
    parsed = parse(f"--flagfile={path}")
    for name in names:
      assert parsed[name].present, (path, name)
    assert parsed["mode"].value == "pretrain"


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_command_line_beats_every_preset_flag_in_both_orders(parse, path):
  preset = {name: parse(f"--flagfile={path}")[name].value for name in preset_flag_names(path)}
  for name, preset_value in preset.items():
    arg, expected = override(cli.FLAGS[name])
    assert expected != preset_value, name
    for argv in ([arg, f"--flagfile={path}"], [f"--flagfile={path}", arg]):
      parsed = parse(*argv)
      assert parsed[name].value == expected, argv
      # The rest of the preset still applies.
      others = {n: parsed[n].value for n in preset if n != name}
      assert others == {n: v for n, v in preset.items() if n != name}, argv


@pytest.mark.parametrize("form", ["--flagfile={}", "-flagfile={}", "--flagfile {}",
                                  "-flagfile {}"])
def test_every_flagfile_form_loses_to_the_command_line(parse, form):
  path = os.path.join(REPO, "flags", "quickstart.cfg")
  flagfile = form.format(path).split(" ")
  for argv in (["--mode=linear_eval", *flagfile], [*flagfile, "--mode=linear_eval"],
               ["--mode", "linear_eval", *flagfile], [*flagfile, "--mode", "linear_eval"]):
    parsed = parse(*argv)
    assert parsed.mode == "linear_eval", argv
    assert parsed.model_dir == "runs/quickstart", argv


def test_repeated_flag_on_the_command_line_last_wins(parse):
  qs = f"--flagfile={os.path.join(REPO, 'flags', 'quickstart.cfg')}"
  assert parse("--seed=5", qs, "--seed=6").seed == 6
  assert parse("--seed=6", qs, "--seed=5").seed == 5
  assert parse(qs, "--mode=plots", "--mode=export").mode == "export"
  assert parse("--mode=export", "--mode=plots", qs).mode == "plots"


def test_nested_flagfiles_expand_in_place_and_later_lines_win(parse, tmp_path):
  base = tmp_path / "base.cfg"
  base.write_text("--seed=1\n--knn_k=10\n--mode=knn_eval\n")
  after = tmp_path / "after.cfg"  # overrides the file it includes
  after.write_text(f"--flagfile={base}\n--seed=2\n")
  before = tmp_path / "before.cfg"  # the included file comes later, so it wins
  before.write_text(f"--seed=3\n--flagfile={base}\n--knn_k=11\n")

  parsed = parse(f"--flagfile={after}")
  assert (parsed.seed, parsed.knn_k, parsed.mode) == (2, 10, "knn_eval")
  parsed = parse(f"--flagfile={before}")
  assert (parsed.seed, parsed.knn_k, parsed.mode) == (1, 11, "knn_eval")
  # The command line beats a nested file too, on either side.
  for argv in (["--seed=9", f"--flagfile={after}"], [f"--flagfile={after}", "--seed=9"]):
    parsed = parse(*argv)
    assert (parsed.seed, parsed.knn_k) == (9, 10), argv
  # Several files on the command line: read in their order, the later one wins.
  assert parse(f"--flagfile={before}", f"--flagfile={after}").seed == 2
  assert parse(f"--flagfile={after}", f"--flagfile={before}").seed == 1


def test_nested_flagfile_paths_are_relative_to_the_current_directory(parse, tmp_path,
                                                                     monkeypatch):
  (tmp_path / "sub").mkdir()
  (tmp_path / "base.cfg").write_text("--seed=4\n")
  (tmp_path / "sub" / "mine.cfg").write_text("--flagfile=base.cfg\n--knn_k=3\n")
  monkeypatch.chdir(tmp_path)
  parsed = parse("--flagfile=sub/mine.cfg")
  assert (parsed.seed, parsed.knn_k) == (4, 3)


def test_flagfile_moves_but_nothing_after_double_dash(parse):
  path = os.path.join(REPO, "flags", "quickstart.cfg")
  assert flagfiles.command_line_first(["run.py", "--mode=plots", "--flagfile", path, "--seed=2",
                                       "--", "--flagfile=x"]) == [
      "run.py", f"--flagfile={path}", "--mode=plots", "--seed=2", "--", "--flagfile=x"]


@pytest.mark.slow
def test_mode_from_the_command_line_reaches_main(tmp_path):
  """Through app.run in a real process: --mode=linear_eval before the quickstart preset (whose
  own --mode is pretrain) must run linear_eval, which stops on the empty model_dir instead of
  pretraining into it."""
  d = tmp_path / "empty"
  d.mkdir()
  p = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "--mode=linear_eval",
                      "--flagfile=flags/quickstart.cfg", f"--model_dir={d}",
                      # Keeps the failure quick if the preset's pretrain wins again.
                      "--train_steps=1", "--noplots"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert f"error: --model_dir={d} holds no checkpoint" in p.stderr
  assert os.listdir(d) == []
