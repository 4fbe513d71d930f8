"""Progress of the long stages after (and around) training: feature extraction, kNN, t-SNE, the
probe fit, exports.

Silent by default (a library call prints nothing); the CLI calls `set_verbose(--verbose)`:
0 silent, 1 a `keras.utils.Progbar` on a terminal (one line per stage when stdout is a file or
pipe, where a redrawn bar would leave hundreds of lines), 2 one line per stage. Everything goes
to stdout before the results JSON, which stays the last line.
"""

from __future__ import annotations

import contextlib
import sys
import time

import keras

_VERBOSE = 0


def set_verbose(level):
  global _VERBOSE
  _VERBOSE = int(level)


def verbose():
  return _VERBOSE


def say(text):
  """One line of progress (nothing when silent)."""
  if _VERBOSE:
    print(text, flush=True)


class Bar:
  """`update(n)` after each of `target` units; a Progbar on a terminal at verbose 1, else one line
  with the count and seconds when the stage ends."""

  def __init__(self, name, target=None, unit="images"):
    self.name, self.target, self.unit = name, target, unit
    self.done = 0
    self._t = time.perf_counter()
    self._bar = None
    if _VERBOSE == 1 and sys.stdout.isatty():
      print(name, flush=True)
      self._bar = keras.utils.Progbar(target, unit_name=unit)

  def update(self, n=1):
    self.done += n
    if self._bar is not None:
      self._bar.update(self.done)

  def close(self):
    seconds = time.perf_counter() - self._t
    if self._bar is not None:
      if self.target is None or self.done != self.target:
        self._bar.update(self.done, finalize=True)
    else:
      say(f"{self.name}: {self.done:,} {self.unit} in {seconds:.1f} s")


@contextlib.contextmanager
def stage(name, target=None, unit="images"):
  bar = Bar(name, target, unit)
  try:
    yield bar
  finally:
    bar.close()


@contextlib.contextmanager
def timed(name):
  """One line `<name> ... done in N s` for a stage without a natural count."""
  t = time.perf_counter()
  yield
  say(f"{name}: done in {time.perf_counter() - t:.1f} s")


@contextlib.contextmanager
def silenced():
  """No progress inside the block (a stage run inside training, whose own line says it all)."""
  global _VERBOSE
  saved, _VERBOSE = _VERBOSE, 0
  try:
    yield
  finally:
    _VERBOSE = saved
