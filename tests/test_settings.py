"""setting(): a dataclass field that is also a flag; the flags generated from a section."""

import dataclasses

import pytest
from absl import flags

from nnclr_tf import settings
from nnclr_tf.settings import setting


@dataclasses.dataclass(frozen=True)
class Toy:
  steps: int = setting(3, "Steps.")
  rate: float = setting(0.5, "Rate.", aliases=("lr",))
  kind: str = setting("a", "Kind.", choices=("a", "b"))
  fast: bool = setting(False, "Fast.")
  pair: tuple = setting((1.0, 0.25), "Pair.", parse=lambda v, flag: tuple(float(x) for x in v))
  scale: tuple = setting((0.1, 1.0), "Scale.", flag="min_scale",
                         parse=lambda v, flag: (float(v), 1.0), render=lambda v: v[0])
  hidden: int = 7  # library-only: no flag


def test_each_setting_is_a_flag_of_its_type_with_its_default():
  specs = settings.flag_specs({"toy": Toy})
  assert list(specs) == ["steps", "rate", "kind", "fast", "pair", "min_scale"]
  fv = flags.FlagValues()
  settings.define_flags(specs, fv)
  fv(["x", "--lr=0.75", "--kind=b", "--fast", "--pair=2,3", "--min_scale=0.4"])
  assert (fv.steps, fv.rate, fv.kind, fv.fast, fv.pair, fv.min_scale) == (
      3, 0.75, "b", True, ["2", "3"], 0.4)
  assert isinstance(fv["steps"], flags.Flag) and fv["steps"].help == "Steps."
  assert specs["pair"].to_field(fv.pair) == (2.0, 3.0)
  assert specs["min_scale"].to_field(fv.min_scale) == (0.4, 1.0)
  assert specs["min_scale"].to_flag((0.2, 1.0)) == 0.2 and specs["pair"].flag_default == [
      "1.0", "0.25"]
  with pytest.raises(flags.IllegalFlagValueError):
    fv(["x", "--kind=c"])


def test_a_flag_declared_twice_is_refused():
  @dataclasses.dataclass(frozen=True)
  class Other:
    steps: int = setting(1, "Again.")

  with pytest.raises(ValueError, match="--steps is declared twice"):
    settings.flag_specs({"toy": Toy, "other": Other})
