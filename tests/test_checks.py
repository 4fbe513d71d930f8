"""The shared value checks: each condition once, one ConfigError naming the flag and the fix."""

import pytest

from nnclr_tf.checks import check_batch, floats
from nnclr_tf.errors import ConfigError


@pytest.mark.parametrize("args,needle", [
    ((0, 64), "--batch_size=0 must be positive"),
    ((18, 36, 4), "must be divisible by the 4 replicas"),
    ((128, 64), "--queue_size=64 is smaller than --batch_size=128"),
    ((24, 64), "--queue_size=64 must be a multiple of --batch_size=24 (static-shape enqueue); "
               "try 48"),
    ((16, 64, 1, 65), "--nn_topk=65 must be between 1 and --queue_size=64"),
    ((16, 64, 1, 1, 15), "--batch_size=16 is larger than the 15 training examples"),
])
def test_check_batch(args, needle):
  with pytest.raises(ConfigError) as e:
    check_batch(*args)
  assert needle in str(e.value)
  check_batch(16, 64, 2, 3, 16)  # every rule met


def test_floats_reads_strings_lists_and_refuses_the_wrong_count():
  assert floats("1.0,0.1", "blur_prob", 2) == (1.0, 0.1)
  assert floats(["1e-4", 1e-3], "linear_l2") == (1e-4, 1e-3)
  with pytest.raises(ConfigError, match="--blur_prob=1: give two probabilities, e.g. 1.0,0.1"):
    floats("1", "blur_prob", 2)
