"""`python run.py --mode=... --flagfile=flags/<preset>.cfg`: the same command as `nnclr-tf`
(nnclr_tf/cli.py defines the flags and exit codes)."""

from nnclr_tf.cli import run

if __name__ == "__main__":
  run()
