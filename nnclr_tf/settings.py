"""Config fields that are also command-line flags: the one place a setting's default, flag name,
help text, choices and old names are written.

A section of `config.Experiment` declares each setting as `setting(default, help, ...)`; the CLI's
absl flags are generated from those fields (`define_flags`), and an Experiment is built from
flag values through the same specs (`FlagSpec.to_field`). Fields declared without `setting` are
library-only (no flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from absl import flags


def setting(default, help: str, *, flag: str | None = None, aliases: Iterable[str] = (),
            choices: Iterable[str] | None = None, parse: Callable | None = None,
            render: Callable | None = None):
  """A dataclass field that is the flag `--<flag or the field's name>`.

  parse(value, flag_name) turns a flag value (or what a user passes to `Experiment.replace`) into
  the field's value and render(field value) back into the flag's; both default to the identity
  (list flags: a tuple of floats and a list of strings)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "aliases": tuple(aliases),
      "choices": tuple(choices) if choices is not None else None, "parse": parse,
      "render": render})


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """One flag: which section field it sets and how its values convert."""
  name: str
  section: str
  field: str
  default: Any          # the field's default
  help: str
  aliases: tuple
  choices: tuple | None
  parse: Callable | None
  render: Callable | None

  def to_field(self, value):
    if self.parse is not None:
      return self.parse(value, self.name)
    return value

  def to_flag(self, value):
    if self.render is not None:
      return self.render(value)
    return list(value) if isinstance(value, tuple) else value

  @property
  def flag_default(self):
    value = self.to_flag(self.default)
    return [str(v) for v in value] if isinstance(value, list) else value


def flag_specs(sections: dict[str, type]) -> dict[str, FlagSpec]:
  """{flag name: FlagSpec} of every `setting` field of the section classes, in order."""
  out: dict[str, FlagSpec] = {}
  for section, cls in sections.items():
    for f in dataclasses.fields(cls):
      if "help" not in f.metadata:
        continue
      m = f.metadata
      spec = FlagSpec(m["flag"] or f.name, section, f.name, f.default, m["help"], m["aliases"],
                      m["choices"], m["parse"], m["render"])
      if spec.name in out:
        raise ValueError(f"flag --{spec.name} is declared twice ({section}.{f.name})")
      out[spec.name] = spec
  return out


def define_flags(specs: dict[str, FlagSpec], fv: flags.FlagValues):
  """Defines every spec's flag (and its aliases) on `fv`; the type follows the default."""
  for spec in specs.values():
    default = spec.flag_default
    if spec.choices is not None:
      flags.DEFINE_enum(spec.name, default, list(spec.choices), spec.help, flag_values=fv)
    elif isinstance(default, bool):
      flags.DEFINE_bool(spec.name, default, spec.help, flag_values=fv)
    elif isinstance(default, int):
      flags.DEFINE_integer(spec.name, default, spec.help, flag_values=fv)
    elif isinstance(default, float):
      flags.DEFINE_float(spec.name, default, spec.help, flag_values=fv)
    elif isinstance(default, list):
      flags.DEFINE_list(spec.name, default, spec.help, flag_values=fv)
    else:
      flags.DEFINE_string(spec.name, default, spec.help, flag_values=fv)
    for alias in spec.aliases:
      flags.DEFINE_alias(alias, spec.name, flag_values=fv)
