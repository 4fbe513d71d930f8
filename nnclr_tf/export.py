"""SavedModel export of the encoder for TF Serving."""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow as tf


class _EncoderModule(tf.Module):

  def __init__(self, encoder, image_size):
    super().__init__()
    self.encoder = encoder
    self.image_size = image_size

  @tf.function
  def serve(self, images):
    x = tf.image.convert_image_dtype(images, tf.float32)
    x = tf.image.resize(x, [self.image_size, self.image_size], method="bilinear")
    return {"features": tf.cast(self.encoder(x, training=False), tf.float32)}


def export_encoder(encoder, image_size, export_dir):
  """Writes a SavedModel whose `serving_default` maps `images` uint8 [N, S, S, 3] to `features`.

  The model is written to a temporary sibling folder and renamed into place, so a crash never
  leaves a half-written version that a server would load.
  """
  module = _EncoderModule(encoder, image_size)
  spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")
  signature = module.serve.get_concrete_function(spec)
  parent = os.path.dirname(os.path.abspath(export_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    tf.saved_model.save(module, tmp, signatures={"serving_default": signature})
    if os.path.exists(export_dir):
      raise FileExistsError(f"export {export_dir} already exists; refusing to overwrite it")
    os.rename(tmp, export_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return export_dir
