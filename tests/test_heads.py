"""The projection and prediction heads, as NNCLR builds them (paper, Sec. 4 / appendix)."""

import keras

from nnclr_tf.heads import prediction_head, projection_head
from nnclr_tf.model import NNCLR


def test_heads_follow_the_paper_spec():
  model = NNCLR(backbone="small_cnn", image_size=16, width=8, queue_size=64)
  dense = [l for l in model.projector.layers if isinstance(l, keras.layers.Dense)]
  bns = [l for l in model.projector.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert [d.units for d in dense] == [2048, 2048, 256] and len(bns) == 3
  relus = [l for l in model.projector.layers if isinstance(l, keras.layers.ReLU)]
  assert len(relus) == 2  # ReLU after all but the last layer
  dense = [l for l in model.predictor.layers if isinstance(l, keras.layers.Dense)]
  bns = [l for l in model.predictor.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert [d.units for d in dense] == [4096, 256] and len(bns) == 1 and dense[1].use_bias
  assert all(b.synchronized for b in bns)


def test_heads_alone_map_their_sizes():
  proj = projection_head(12, 32, 8, 2, global_bn=False)
  pred = prediction_head(8, 16, global_bn=False)
  assert proj.output.shape[-1] == 8 and pred.output.shape[-1] == 8
  assert [d.units for d in proj.layers if isinstance(d, keras.layers.Dense)] == [32, 8]
