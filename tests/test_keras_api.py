"""The model as a Keras user drives it: fit with validation_data and evaluate (support set read,
never written), a user's own tf.data and backbone, raw images into model(...), the portable
encoder loaded where nnclr_tf cannot be imported, and model.export."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import oracles
from conftest import mirrored
from nnclr_tf import augment, data
from nnclr_tf.backbones import KERAS_APPLICATIONS, build_backbone
from nnclr_tf.batchnorm import BatchNormalization as FusedBN
from nnclr_tf.config import BACKBONES, AugmentConfig
from nnclr_tf.errors import DataError
from nnclr_tf.model import NNCLR

TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64, temperature=0.1)
# No randomness but the (identity-sized) resize: a view is the evaluation view of its image.
NO_AUG = AugmentConfig(crop=False, flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0),
                       solarize_prob=(0, 0))


def pairs(seed, n=16, size=16):
  rng = np.random.default_rng(seed)
  return {"view1": rng.random((n, size, size, 3)).astype(np.float32),
          "view2": rng.random((n, size, size, 3)).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32)}


def oracle(model, batch):
  """(loss, contrastive accuracy) of held-out pairs in numpy, from the model's inference-mode
  embeddings and its support set: the paper's loss, with the column term when symmetric."""
  n = len(batch["label"])
  _, z, p = (t.numpy() for t in model.embed(np.concatenate([batch["view1"], batch["view2"]])))
  queue = model.support_set.embeddings.numpy()
  nn = queue[np.argmax(z @ queue.T, axis=1)]
  t = model.config.temperature

  loss = 0.5 * (oracles.nnclr_loss(nn[:n], p[n:], t, model.config.symmetric_loss)
                + oracles.nnclr_loss(nn[n:], p[:n], t, model.config.symmetric_loss))
  acc = np.mean(np.argmax(nn[:n] @ p[n:].T, axis=1) == np.arange(n))
  return loss, acc


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_validation_and_evaluate_score_without_writing_the_support_set(replicas):
  """fit's validation loss and evaluate's are the numpy loss of the held-out pairs at the trained
  weights (symmetric term included), on one replica and under MirroredStrategy; evaluating
  leaves the support set's rows, labels and pointer as training left them."""
  strategy = mirrored(2) if replicas == 2 else tf.distribute.get_strategy()
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = NNCLR(**TINY, symmetric_loss=True, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
  train = tf.data.Dataset.from_tensors(pairs(0)).repeat(3)
  held = pairs(1)
  val = tf.data.Dataset.from_tensors(held)
  history = model.fit(train, validation_data=val, epochs=1, verbose=0).history
  queue = {v.name: v.numpy().copy() for v in model.support_set.weights}
  assert int(queue["pointer"]) == 48  # three training steps of 16 wrote; validation did not
  got = model.evaluate(val, return_dict=True, verbose=0)
  for v in model.support_set.weights:
    np.testing.assert_array_equal(v.numpy(), queue[v.name], err_msg=v.name)
  want_loss, want_acc = oracle(model, held)
  assert got["loss"] == pytest.approx(want_loss, rel=1e-4)
  assert history["val_loss"][-1] == pytest.approx(want_loss, rel=1e-4)
  assert got["contrastive_acc"] == pytest.approx(want_acc)


def test_pretraining_stream_from_images_or_pairs_of_any_size():
  """Mixed-size uint8 images or float (image, label) pairs give the fit batches; with the
  augmentation off a view is the evaluation view of its image (rounded to uint8, as every crop
  is before the colour stage); a finite stream ends fit's
  epochs; other structures are a DataError naming the accepted ones."""
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
            [(20, 24), (16, 16), (40, 12), (9, 9), (30, 30)] * 2]
  ds = tf.data.Dataset.from_generator(lambda: iter(images),
                                      output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  batches = list(data.pretraining_stream(ds, NO_AUG, image_size=16, batch_size=4, epochs=1))
  assert len(batches) == 2  # 10 images, batches of 4, the partial one dropped
  for i, b in enumerate(batches):
    want = np.stack([augment.eval_transform(im, 16) for im in images[4 * i:4 * i + 4]])
    np.testing.assert_allclose(b["view1"], want, atol=0.501 / 255)
    np.testing.assert_allclose(b["view2"], b["view1"])
    np.testing.assert_array_equal(b["label"], -1)
  floats = np.stack([im[:9, :9] for im in images]).astype(np.float32) / 255
  labels = np.arange(10, dtype=np.int64)
  pairs_ds = tf.data.Dataset.from_tensor_slices((floats, labels))
  crop_flip = AugmentConfig(jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0), solarize_prob=(0, 0))
  stream = data.pretraining_stream(pairs_ds, crop_flip, image_size=16, batch_size=5, epochs=1,
                                   seed=3)
  b = next(iter(stream))
  assert b["view1"].shape == (5, 16, 16, 3) and b["label"].dtype == tf.int32
  np.testing.assert_array_equal(b["label"], [0, 1, 2, 3, 4])
  assert 0 <= float(tf.reduce_min(b["view1"])) and float(tf.reduce_max(b["view1"])) <= 1
  # Each pass draws new augmentations (fit epochs differ) from the seed (runs repeat).
  again = next(iter(stream))["view1"].numpy()
  assert np.abs(again - b["view1"].numpy()).max() > 0.05
  same = next(iter(data.pretraining_stream(pairs_ds, crop_flip, image_size=16, batch_size=5,
                                           epochs=1, seed=3)))["view1"]
  np.testing.assert_array_equal(same, b["view1"])

  model = NNCLR(**{**TINY, "queue_size": 20})
  model.compile(optimizer="sgd", run_eagerly=True)
  history = model.fit(stream, epochs=2, verbose=0).history
  assert len(history["loss"]) == 2 and int(model.optimizer.iterations.numpy()) == 4

  bad = [(tf.data.Dataset.from_tensor_slices(floats).batch(2), "unbatch"),
         (tf.data.Dataset.from_tensor_slices({"image": floats}), r"\(image, label\)"),
         (tf.data.Dataset.from_tensor_slices((floats, floats)), "integer scalar labels"),
         (tf.data.Dataset.from_tensor_slices(["a.png"]), "single images"),
         (floats, "got ndarray")]
  for ds_, match in bad:
    with pytest.raises(DataError, match=match):
      data.pretraining_stream(ds_)


def test_model_call_and_export_take_raw_images_like_the_served_encoder(tmp_path):
  """model(uint8 of any size) is the encoder on eval_transform(images) (cropped at the model's
  eval_crop_fraction), model.encode(float) the same, and model.export's SavedModel serves the
  same features; other export formats point to the portable encoder."""
  model = NNCLR(**TINY, eval_crop_fraction=0.875)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 40, 27, 3), dtype=np.uint8)
  # The oracle: short side to round(16 / 0.875) = 18, aspect kept, centre 16 x 16.
  x = tf.image.resize(images.astype(np.float32) / 255, [27, 18], antialias=True)
  x = np.clip(x.numpy()[:, 5:21, 1:17], 0, 1)
  want = model.encoder(x, training=False).numpy()
  np.testing.assert_allclose(model(images), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.encode(images.astype(np.float32) / 255), want, rtol=1e-5,
                             atol=1e-5)
  path = model.export(str(tmp_path / "enc"), verbose=False)
  served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
  np.testing.assert_allclose(served["features"], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="portable_encoder"):
    model.export(str(tmp_path / "x"), format="onnx")


def tiny_backbone():
  inputs = keras.Input((None, None, 3))
  x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
  x = keras.layers.BatchNormalization()(x)
  return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="mine")


def test_user_backbone_trains_saves_checkpoints_and_exports(tmp_path):
  keras.utils.set_random_seed(0)
  model = NNCLR(**{**TINY, "backbone": tiny_backbone()})
  assert model.encoder.output.shape == (None, 8)
  model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
  model.fit(tf.data.Dataset.from_tensors(pairs(0)), verbose=0)
  images = np.random.default_rng(1).integers(0, 256, (2, 30, 20, 3), dtype=np.uint8)
  want = model(images).numpy()
  model.save(str(tmp_path / "m.keras"))
  loaded = keras.models.load_model(str(tmp_path / "m.keras"))
  np.testing.assert_array_equal(loaded(images), want)
  other = NNCLR(**{**TINY, "backbone": tiny_backbone()})
  tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  tf.train.Checkpoint(model=other).read(str(tmp_path / "ckpt")).assert_existing_objects_matched()
  np.testing.assert_array_equal(other(images), want)
  served = tf.saved_model.load(model.export(str(tmp_path / "enc"), verbose=False))
  np.testing.assert_allclose(served.signatures["serving_default"](images=images)["features"],
                             want, rtol=1e-5, atol=1e-5)
  flat = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)])
  with pytest.raises(ValueError, match=r"one feature vector \[N, D\]"):
    NNCLR(**{**TINY, "backbone": flat})


def test_keras_application_backbones_by_name():
  assert set(KERAS_APPLICATIONS) <= set(BACKBONES)
  m = build_backbone("keras_resnet50", (32, 32, 3), global_bn=True)
  assert m.output.shape == (None, 2048)
  bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
  assert len(bns) == 53 and all(type(b) is FusedBN and b.synchronized for b in bns)
  assert m.layers[1].name == "standardise"  # [0, 1] inputs, as the built-in backbones


CLEAN_LOAD = r"""
import importlib.abc
import sys


class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "nnclr_tf":
      raise ModuleNotFoundError(f"blocked {name}")  # an editable install would find it otherwise


sys.meta_path.insert(0, Block())
import keras
import numpy as np

x = np.load("x.npy")
model = keras.models.load_model("classifier.keras")
np.save("out.npy", model.predict(x, verbose=0))
assert not [m for m in sys.modules if m.split(".")[0] == "nnclr_tf"], "nnclr_tf was imported"
"""


@pytest.mark.slow
def test_downstream_keras_classifier_on_the_portable_encoder_loads_without_nnclr_tf(tmp_path):
  """A trained model's portable encoder has no nnclr_tf layer and the encoder's outputs; a
  classifier built on it, saved as .keras, loads and predicts the same in `python -I` from a
  foreign cwd where nnclr_tf cannot be imported."""
  keras.utils.set_random_seed(0)
  model = NNCLR(**TINY)
  model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
  model.fit(tf.data.Dataset.from_tensors(pairs(0)).repeat(2), verbose=0)  # BN statistics move
  assert any(type(layer) is FusedBN for layer in model.encoder.layers)
  encoder = model.portable_encoder()
  assert not [layer for layer in encoder.layers if type(layer).__module__.startswith("nnclr_tf")]
  x = model.preprocess(np.random.default_rng(2).integers(0, 256, (4, 25, 25, 3), np.uint8))
  np.testing.assert_allclose(encoder(x), model.encoder(x, training=False), rtol=1e-6, atol=1e-6)
  inputs = keras.Input((16, 16, 3))
  classifier = keras.Model(inputs, keras.layers.Dense(10)(encoder(inputs, training=False)))
  classifier.save(str(tmp_path / "classifier.keras"))
  np.save(tmp_path / "x.npy", x.numpy())
  (tmp_path / "load.py").write_text(CLEAN_LOAD)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  p = subprocess.run([sys.executable, "-I", "load.py"], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), classifier.predict(x, verbose=0),
                             rtol=1e-5, atol=1e-5)
