import numpy as np
import pytest

from nnclr_tf import finetune, sources


def test_validation_split_and_label_subsets_are_one_pinned_draw():
  # The index sets the two draws gave before they shared sources.balanced_indices (recorded from
  # the earlier split_balanced and finetune.label_subset): a change to the draw shows here.
  labels = np.arange(30, dtype=np.int32) % 3
  src = sources.Source(labels=labels, paths=np.arange(30))
  assert sources.split_balanced(src, 7, seed=0)[1].paths.tolist() == [7, 12, 14, 17, 18, 28, 29]
  assert sources.split_balanced(src, 5, seed=5)[1].paths.tolist() == [17, 18, 21, 23, 28]
  mixed = np.array([0, -1, 1, 2, -1, 0, 1, 2, 0, 1, -1, 2, 0, 1, 2, 0, -1, 1, 2, 0])
  assert finetune.label_subset(mixed, 0.5, seed=1).tolist() == [0, 3, 7, 8, 9, 13, 15, 17]
  assert finetune.label_subset(labels, 0.2, seed=3).tolist() == [13, 14, 17, 18, 22, 27]
  # Both are balanced_indices: over every index, or over the labelled ones only.
  too_few = lambda *a: "unused"
  np.testing.assert_array_equal(sources.balanced_indices(labels, 7, 0, too_few=too_few),
                                [7, 12, 14, 17, 18, 28, 29])
  np.testing.assert_array_equal(
      sources.balanced_indices(mixed, 8, 1, too_few=too_few, among=np.flatnonzero(mixed >= 0)),
      [0, 3, 7, 8, 9, 13, 15, 17])
  with pytest.raises(sources.DataError, match="^class 0: 11 asked, 10 there$"):
    sources.balanced_indices(labels, 33, 0, too_few=lambda c, want, have: (
        f"class {c}: {want} asked, {have} there"))
