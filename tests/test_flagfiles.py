"""Presets by name or path, and a flagfile mistake as one line (precedence: test_cli_flags.py)."""

import os

import pytest
from absl import flags

from nnclr_tf import flagfiles
from nnclr_tf.errors import ConfigError


def test_presets_resolve_by_name_and_packaged_path(tmp_path):
  packaged = os.path.join(flagfiles.PRESETS_DIR, "quickstart.cfg")
  for name in ("quickstart", "quickstart.cfg", "flags/quickstart.cfg"):
    assert flagfiles.resolve_preset(name) in (packaged, name)
  mine = tmp_path / "quickstart.cfg"
  mine.write_text("--seed=1\n")
  assert flagfiles.resolve_preset(str(mine)) == str(mine)
  assert "quickstart" in flagfiles.presets()


def test_read_flagfile_ignores_undefok_and_names_a_mistyped_flag(tmp_path):
  fv = flags.FlagValues()
  flags.DEFINE_integer("seed", 0, "Seed.", flag_values=fv)
  good = tmp_path / "good.cfg"
  good.write_text("--mode=pretrain\n--seed=4\n")
  assert flagfiles.read_flagfile(fv, str(good), undefok=("mode",)).seed == 4
  bad = tmp_path / "bad.cfg"
  bad.write_text("--sed=4\n")
  with pytest.raises(ConfigError, match=f"unknown flag --sed in --flagfile={bad}; did you mean "
                                        "--seed"):
    flagfiles.read_flagfile(fv, str(bad))


def test_absl_own_flags_are_the_ones_absl_defines():
  from absl import app, logging  # noqa: F401  (they define the flags)
  by_module = flags.FLAGS.flags_by_module_dict()
  defined = {f.name for m in ("absl.app", "absl.logging") for f in by_module.get(m, [])}
  assert defined <= set(flagfiles.ABSL_OWN_FLAGS)


@pytest.mark.parametrize("damage", ["truncated", "emptied", "not text"])
def test_a_damaged_flagfile_is_one_line(tmp_path, damage):
  good = "\n".join([flagfiles.RUN_FLAGS_HEADER, "--mode=pretrain", "--seed=4",
                    flagfiles.RUN_FLAGS_END]) + "\n"
  raw = {"truncated": good[:len(good) // 2].encode(), "emptied": b"",
         "not text": good.encode()[:20] + b"\xff\xfe" + good.encode()[22:]}[damage]
  path = tmp_path / "flags.txt"
  path.write_bytes(raw)
  with pytest.raises(ConfigError, match=f"--flagfile={path} is (damaged|empty)"):
    flagfiles.check_flagfiles(["run.py", f"--flagfile={path}"])
  path.write_text(good + "--seed=5\n")  # a flag added after the end line is an edit, not damage
  flagfiles.check_flagfiles(["run.py", f"--flagfile={path}"])
