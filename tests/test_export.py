import os

import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf.backbones import build_backbone
from nnclr_tf.export import export_encoder


def test_encoder_savedmodel_round_trip(tmp_path):
  enc = build_backbone("small_cnn", (16, 16, 3), global_bn=False, width=8)
  out = export_encoder(enc, 16, str(tmp_path / "encoder" / "1"))
  loaded = tf.saved_model.load(out)
  fn = loaded.signatures["serving_default"]
  images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
  got = fn(images=tf.constant(images))["features"].numpy()
  want = enc(images.astype(np.float32) / 255.0, training=False).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert fn.structured_input_signature[1]["images"].dtype == tf.uint8
  assert [d for d in os.listdir(tmp_path / "encoder")] == ["1"]  # no temp folder left behind


def test_export_never_overwrites(tmp_path):
  enc = build_backbone("small_cnn", (16, 16, 3), global_bn=False, width=8)
  export_encoder(enc, 16, str(tmp_path / "1"))
  with pytest.raises(FileExistsError):
    export_encoder(enc, 16, str(tmp_path / "1"))
  assert sorted(os.listdir(tmp_path)) == ["1"]
