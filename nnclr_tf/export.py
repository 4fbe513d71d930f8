"""SavedModel exports that TF Serving loads as they are: the encoder and the probe classifier.

Layout (TF Serving's model base path): `<export_base>/<model_name>/<version>/` with
`saved_model.pb`, `variables/` and `assets.extra/tf_serving_warmup_requests`; versions are
integers, a new export takes the next one and never overwrites an old one. Each version is written
into a hidden temporary sibling (`.tmp-...`, which TF Serving ignores because it is not an integer)
and renamed into place, so a server never sees a half-written version.

Signatures (identical inputs for both models):
  serving_default    images       uint8  [N, H, W, 3], any H, W
  serve_image_bytes  image_bytes  string [N], JPEG/PNG/GIF/BMP, gray/RGBA/palette allowed
Outputs:
  encoder     features float32 [N, D] (backbone), projection float32 [N, d] (L2-normalised z)
  classifier  probabilities float32 [N, C], class_ids int64 [N], class_names string [N]

Images are preprocessed inside the graph as `data.eval_dataset` does: `augment.eval_transform` at
the training size and the evaluation crop fraction baked in at export time (recorded as
`eval_crop_fraction` in assets.extra/nnclr_tf.json); the backbone standardises internally. Loading
or running an export needs only TensorFlow, no nnclr_tf.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
import tensorflow as tf

from nnclr_tf import augment, linear_probe, progress
from nnclr_tf import model_dir as model_dir_lib
from nnclr_tf.data import decode_image
from nnclr_tf.errors import ExportError

try:  # the `serving` extra: without it exports carry no warm-up requests
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
except ImportError:
  predict_pb2 = prediction_log_pb2 = None

ENCODER = "encoder"
CLASSIFIER = "classifier"
IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_image_bytes"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# Where an export came from (checkpoint step, ...); TF Serving ignores assets.extra/ beyond warm-up.
METADATA_FILE = os.path.join("assets.extra", "nnclr_tf.json")
# linear_eval's probe, relative to model_dir (see `load_probe` for the contract).
PROBE_FILE = model_dir_lib.PROBE_FILE




# ----------------------------------------------------------------------------------------------
# Versions


def versions(model_base):
  """Integer-named entries under `<export_base>/<model_name>`, ascending. Files count too, so the
  next version never collides with a stray file of that name."""
  if not os.path.isdir(model_base):
    return []
  return sorted(int(d) for d in os.listdir(model_base) if d.isdigit())


def next_version(model_base):
  return max(versions(model_base), default=0) + 1


def version_path(export_base, model_name, version):
  return os.path.join(export_base, model_name, str(int(version)))


def _move_into_place(tmp, model_base, version):
  """Renames `tmp` to the requested version (or the next free one when version is 0)."""
  while True:
    v = version or next_version(model_base)
    target = os.path.join(model_base, str(v))
    if os.path.exists(target):
      if version:
        raise ExportError(f"{target} already exists; a served version is never overwritten"
                          ) from None
      continue  # another exporter took it between the listing and here
    try:
      os.rename(tmp, target)  # atomic; fails rather than replace a non-empty version
      return target
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
        raise
      if version:
        raise ExportError(f"{target} already exists; a served version is never overwritten"
                          ) from None


def _make_readable(path):
  # mkdtemp creates 0700; a server running as another user (e.g. in a container) must read it.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o777 & ~umask)


def _save_versioned(module, signatures, export_base, model_name, version, warmup, metadata=None):
  model_base = os.path.join(export_base, model_name)
  if version and os.path.exists(os.path.join(model_base, str(version))):
    raise ExportError(f"{os.path.join(model_base, str(version))} already exists; a served "
                      "version is never overwritten")
  try:
    os.makedirs(model_base, exist_ok=True)
    model_dir_lib.remove_orphans(model_base)  # left by a kill mid-export
    tmp = tempfile.mkdtemp(prefix=model_dir_lib.temp_prefix(model_name), dir=model_base)
  except OSError as e:
    raise ExportError(f"cannot write exports under {export_base} ({e.strerror}); choose another "
                      "export base") from None
  try:
    _make_readable(tmp)
    with progress.timed(f"{model_name} SavedModel for TF Serving"):
      tf.saved_model.save(module, tmp, signatures=signatures)
    if warmup:
      _write_warmup(tmp, model_name, module.image_size)
    _write_metadata(tmp, metadata or {})
    return _move_into_place(tmp, model_base, version)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _write_metadata(export_dir, metadata):
  path = os.path.join(export_dir, METADATA_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)


def read_metadata(export_dir):
  """The export's `assets.extra/nnclr_tf.json` ({} for an export written before it existed, and,
  with one warning line, for a damaged one: its origin is then unknown, so the pretraining run
  that reuses an export of its final checkpoint exports a new version; the damaged one is left
  as it is)."""
  file_path = os.path.join(export_dir, METADATA_FILE)
  meta, reason = model_dir_lib.json_damage(file_path)
  if reason:
    model_dir_lib.warn_once(file_path, f"{file_path} is damaged ({reason}); the checkpoint that "
                                       "export was made from is unknown")
  return meta or {}


def newest_export(export_base, model_name=ENCODER):
  """(path, metadata) of the newest version under `<export_base>/<model_name>`, or (None, {})."""
  found = versions(os.path.join(export_base, model_name))
  if not found:
    return None, {}
  path = version_path(export_base, model_name, found[-1])
  return path, read_metadata(path)


def dir_size(path):
  """Bytes on disk of every file under `path`."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------------------------
# The linear probe written by linear_eval


Probe = linear_probe.Probe  # logits = ((features - feature_mean) / feature_std) @ kernel + bias


def load_probe(path):
  """Reads `model_dir/linear_probe/probe.npz` with `linear_probe.load_probe` (the one reader of
  the file); a missing, unreadable or inconsistent file is an ExportError naming the fix."""
  try:
    return linear_probe.load_probe(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing, damaged, garbled
    raise ExportError(f"cannot use the linear probe {path} ({' '.join(str(e).split())}); run "
                      "--mode=linear_eval to write it") from None


# ----------------------------------------------------------------------------------------------
# The servable graph


def preprocess(images, image_size, crop_fraction=1.0):
  """uint8 [N, H, W, 3] -> float [N, S, S, 3] in [0, 1]: `augment.eval_transform` on a batch."""
  return augment.eval_transform(images, image_size, crop_fraction)


class _Servable(tf.Module):
  """Encoder (+ projector, + optional linear probe) behind the two serving signatures."""

  def __init__(self, model, probe=None, crop_fraction=1.0):
    super().__init__(name=ENCODER if probe is None else CLASSIFIER)
    self.image_size = int(model.config.image_size)
    self.crop_fraction = float(crop_fraction)  # a constant of the traced signatures
    # Stock Keras layers only: what users load or build on must not need nnclr_tf's classes.
    self.encoder = model.portable_encoder()
    self.probe = probe is not None
    if probe is None:
      self.projector = model.projector  # the classifier does not carry it
    else:
      self.kernel = tf.Variable(probe.kernel, trainable=False, name="probe_kernel")
      self.bias = tf.Variable(probe.bias, trainable=False, name="probe_bias")
      self.feature_mean = tf.Variable(probe.feature_mean, trainable=False, name="feature_mean")
      self.feature_std = tf.Variable(probe.feature_std, trainable=False, name="feature_std")
      self.class_names = tf.Variable(list(probe.class_names), trainable=False, name="class_names")

  def _outputs(self, x):
    h = self.encoder(x, training=False)
    features = tf.cast(h, tf.float32)
    if not self.probe:
      z = self.projector(h, training=False)
      return {"features": features,
              "projection": tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)}
    logits = tf.matmul((features - self.feature_mean) / self.feature_std, self.kernel) + self.bias
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    return {"probabilities": tf.nn.softmax(logits, axis=-1), "class_ids": class_ids,
            "class_names": tf.gather(self.class_names, class_ids)}

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve_images(self, images):
    return self._outputs(preprocess(images, self.image_size, self.crop_fraction))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve_image_bytes(self, image_bytes):
    size = self.image_size

    def one(data):  # the file path of data.eval_dataset: decode, then the eval transform
      return augment.eval_transform(decode_image(data), size, self.crop_fraction)

    x = tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    return self._outputs(x)

  def signatures(self):
    return {IMAGES_SIGNATURE: self.serve_images.get_concrete_function(),
            BYTES_SIGNATURE: self.serve_image_bytes.get_concrete_function()}


# ----------------------------------------------------------------------------------------------
# Serving warm-up


def warmup_inputs(image_size, seed=0):
  """(signature_name, {input: numpy array}) pairs: a few requests shaped like real traffic."""
  rng = np.random.default_rng(seed)
  s = image_size

  def images(n, h, w):
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)

  def encoded(image, fmt):
    enc = tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg
    return enc(tf.constant(image)).numpy()

  return [
      (IMAGES_SIGNATURE, {"images": images(1, s, s)}),
      (IMAGES_SIGNATURE, {"images": images(8, s, s)}),
      (IMAGES_SIGNATURE, {"images": images(2, 2 * s, 3 * s // 2)}),  # a client sending raw photos
      (BYTES_SIGNATURE, {"image_bytes": np.array([encoded(im, "png") for im in images(2, s, s)],
                                                 dtype=object)}),
      (BYTES_SIGNATURE, {"image_bytes": np.array([encoded(images(1, 2 * s, 2 * s)[0], "jpeg")],
                                                 dtype=object)}),
  ]


def _write_warmup(export_dir, model_name, image_size):
  """`assets.extra/tf_serving_warmup_requests`: PredictionLog records TF Serving replays at load,
  so the first real request does not pay for graph initialisation."""
  if predict_pb2 is None:
    tf.get_logger().warning("tensorflow-serving-api is not installed: %s written without warm-up "
                            "requests (pip install tensorflow-serving-api)", export_dir)
    return
  path = os.path.join(export_dir, WARMUP_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for signature, inputs in warmup_inputs(image_size):
      request = predict_pb2.PredictRequest()
      request.model_spec.name = model_name
      request.model_spec.signature_name = signature
      for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
      log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())


# ----------------------------------------------------------------------------------------------
# Public API


def _with_crop_fraction(metadata, crop_fraction):
  meta = {**(metadata or {}), "eval_crop_fraction": float(crop_fraction)}
  if "preprocessing" in meta and "image_size" in meta:
    size, f = int(meta["image_size"]), float(crop_fraction)
    meta["preprocessing"] = {**meta["preprocessing"], "crop_fraction": f, "resize": (
        f"whole image to {size}x{size}, bilinear, antialiased, aspect ratio not kept" if f == 1
        else f"shorter side to {augment.eval_short_side(size, f)}, bilinear, antialiased, then "
             f"the centre {size}x{size}")}
  return meta


def export_encoder(model, export_base, version=0, warmup=True, metadata=None, crop_fraction=1.0):
  """Writes `<export_base>/encoder/<version>/` from an NNCLR model (encoder + projector).

  version 0 takes the next free integer; an existing version raises ExportError. `metadata`
  (e.g. {"checkpoint_step": N}) goes to `assets.extra/nnclr_tf.json`, with `eval_crop_fraction`.
  `crop_fraction` is the evaluation crop fraction the signatures preprocess with (the run's
  DataConfig.eval_crop_fraction). Returns the path.
  """
  module = _Servable(model, crop_fraction=crop_fraction)
  return _save_versioned(module, module.signatures(), export_base, ENCODER, version, warmup,
                         _with_crop_fraction(metadata, crop_fraction))


def save_encoder(model, path, crop_fraction=1.0):
  """Writes the encoder SavedModel (the signatures of `export_encoder`) to `path` itself, with
  no versions and no warm-up requests: `NNCLR.export`. Returns the path."""
  module = _Servable(model, crop_fraction=crop_fraction)
  tf.saved_model.save(module, path, signatures=module.signatures())
  _write_metadata(path, _with_crop_fraction({}, crop_fraction))
  return path


def export_classifier(model, probe, export_base, version=0, warmup=True, metadata=None,
                      crop_fraction=1.0):
  """Writes `<export_base>/classifier/<version>/`: the encoder followed by the linear probe.

  `probe` is a `Probe` or the path of `model_dir/linear_probe/probe.npz`; `crop_fraction` must be
  the one its features were extracted at (as for `export_encoder`). Returns the path.
  """
  if not isinstance(probe, Probe):
    probe = load_probe(probe)
  dim = int(model.encoder.output.shape[-1])
  if probe.kernel.shape[0] != dim:
    raise ExportError(f"the linear probe takes {probe.kernel.shape[0]}-d features but the "
                      f"backbone gives {dim}-d; re-run --mode=linear_eval on this model")
  if probe.image_size != int(model.config.image_size):
    raise ExportError(f"the linear probe was trained at image_size {probe.image_size} but the "
                      f"model at {model.config.image_size}; re-run --mode=linear_eval on this "
                      "model")
  module = _Servable(model, probe, crop_fraction)
  return _save_versioned(module, module.signatures(), export_base, CLASSIFIER, version, warmup,
                         _with_crop_fraction(metadata, crop_fraction))
