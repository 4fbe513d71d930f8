"""Running the CLI in this process and crashing a fit mid-way, shared by test_reliability,
test_imagenet_subsets and test_linear_sgd."""

import keras

from nnclr_tf import cli as cli_lib


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_cli(capsys, *args):
  """(exit code, the `error:` lines, stderr) of run.py's parse + run_main, in this process."""
  cli_lib.FLAGS.unparse_flags()
  code = 0
  try:
    cli_lib.parse_flags(["run.py", *args])
    cli_lib.run_main(["run.py"])
  except SystemExit as e:
    code = e.code or 0
  finally:
    cli_lib.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  return code, error_lines(err), err


class CrashAfter(keras.callbacks.Callback):
  """Raises `error` out of model.fit at the end of step `step` (after CheckpointCallback has run
  for it), as a kill would end the process: nothing saved on the way out."""

  def __init__(self, step, error=RuntimeError):
    super().__init__()
    self.step, self.error = step, error

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) == self.step:
      raise self.error(f"crash at step {self.step}")
