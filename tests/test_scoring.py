"""The supervised protocols' data rules (the figures themselves: tests/test_evaluation.py,
tests/test_run_eval.py)."""

import pytest

from nnclr_tf import scoring
from nnclr_tf.config import Experiment
from nnclr_tf.errors import DataError


def test_supervised_protocols_need_a_labelled_eval_split():
  with pytest.raises(DataError, match="--mode=linear_eval needs a labelled eval split: set "
                                      "--val_images=N"):
    scoring.labelled_splits(Experiment(), "linear_eval")  # digits, no held-out images
  train, held, classes = scoring.labelled_splits(Experiment().replace(val_images=100), "finetune")
  assert classes == 10 and len(held) == 100 and len(train) + len(held) == 1797
