"""Stage lines on stdout: quiet at --verbose=0, one line per stage otherwise (no terminal here)."""

from nnclr_tf import progress


def test_stage_lines_follow_verbose(capsys):
  progress.set_verbose(0)
  progress.say("hidden")
  with progress.stage("features", target=3) as bar:
    bar.update(3)
  assert capsys.readouterr().out == ""
  progress.set_verbose(2)
  try:
    with progress.stage("features", target=3) as bar:
      bar.update(2)
    with progress.timed("probe"):
      pass
  finally:
    progress.set_verbose(0)
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("features: 2 images in ") and out[0].endswith(" s")
  assert out[1].startswith("probe: done in ")
