"""TF Serving exports: layout and versions, what a server sees (signatures, warm-up), outputs equal
to the in-memory model in a process where nnclr_tf cannot be imported, crash safety, and the Keras
format round trip.

One module-scoped run.py pretrain + export (tiny model) feeds the end-to-end tests."""

import hashlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from nnclr_tf import augment, export
from nnclr_tf.model import NNCLR

TINY = ["--flagfile=flags/quickstart.cfg", "--val_images=0", "--train_steps=2", "--width=8",
        "--proj_hidden_dim=32", "--pred_hidden_dim=32", "--embedding_dim=16", "--batch_size=32",
        "--queue_size=64", "--verbose=0"]
FEATURE_DIM = 32  # small_cnn: 4 x width
CLASS_NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                        "nine"])


def run(args, timeout=300):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, path).encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def write_probe(path, seed=0, dim=FEATURE_DIM, image_size=16, **override):
  """A probe.npz following the linear_eval contract, with random (seeded) parameters."""
  rng = np.random.default_rng(seed)
  c = len(CLASS_NAMES)
  arrays = dict(kernel=rng.normal(size=(dim, c)).astype(np.float32),
                bias=rng.normal(size=c).astype(np.float32),
                feature_mean=rng.normal(size=dim).astype(np.float32) * 0.1,
                feature_std=rng.uniform(0.5, 2.0, size=dim).astype(np.float32),
                class_names=CLASS_NAMES, image_size=np.array(image_size))
  arrays.update(override)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **arrays)
  return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """run.py pretrain (exports encoder/1), a probe.npz, then run.py --mode=export (encoder/2 and
  classifier/1)."""
  d = str(tmp_path_factory.mktemp("served") / "m")
  p = run([*TINY, f"--model_dir={d}"])
  assert p.returncode == 0, p.stderr[-3000:]
  base = os.path.join(d, "export")
  digest = tree_digest(os.path.join(base, "encoder", "1"))
  probe = write_probe(os.path.join(d, export.PROBE_FILE))
  p = run([*TINY, f"--model_dir={d}", "--mode=export"])
  assert p.returncode == 0, p.stderr[-3000:]
  return dict(model_dir=d, base=base, encoder1_digest=digest, probe=probe,
              results=json.loads(p.stdout.strip().splitlines()[-1]))


def restored_model(model_dir):
  with open(os.path.join(model_dir, "model_config.json")) as f:
    model = NNCLR.from_config(json.load(f))
  status = tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(model_dir))
  status.assert_existing_objects_matched().expect_partial()
  return model


@pytest.mark.slow
def test_run_export_versions_and_layout(served):
  base, r = served["base"], served["results"]
  assert sorted(os.listdir(os.path.join(base, "encoder"))) == ["1", "2"]  # no temp dir left
  assert sorted(os.listdir(os.path.join(base, "classifier"))) == ["1"]
  assert r["encoder_export_dir"] == os.path.join(base, "encoder", "2")
  assert r["classifier_export_dir"] == os.path.join(base, "classifier", "1")
  assert r["encoder_export_bytes"] == export.dir_size(r["encoder_export_dir"]) > 10_000
  # The second export left version 1 byte for byte as it was.
  assert tree_digest(os.path.join(base, "encoder", "1")) == served["encoder1_digest"]
  with open(os.path.join(served["model_dir"], "pretrain_results.json")) as f:
    assert json.load(f)["export_dir"] == os.path.join(base, "encoder", "1")
  for v in ("encoder/1", "encoder/2", "classifier/1"):
    for name in ("saved_model.pb", "variables", export.WARMUP_FILE):
      assert os.path.exists(os.path.join(base, v, name)), (v, name)


@pytest.mark.slow
def test_existing_export_version_is_refused(served):
  before = tree_digest(served["base"])
  p = run([*TINY, f"--model_dir={served['model_dir']}", "--mode=export", "--export_version=1"])
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert lines[-1].startswith("error: --export_version=1: ") and "already exists" in lines[-1]
  assert "next free: 3" in lines[-1] and "Traceback" not in p.stderr
  assert tree_digest(served["base"]) == before


CLEAN_CHECK = r"""
'''Runs in `python -I` from a foreign cwd, where nnclr_tf cannot be imported: loads each export
with TensorFlow alone, runs both signatures, and runs `saved_model_cli show --all` (the console
script's own entry point, in this process to save a TensorFlow import).'''
import contextlib
import importlib.abc
import io
import sys


class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "nnclr_tf":
      raise ModuleNotFoundError(f"blocked {name}")  # an editable install would find it otherwise


sys.meta_path.insert(0, Block())
try:
  import nnclr_tf  # noqa: F401
  sys.exit("nnclr_tf is importable in the clean process")
except ModuleNotFoundError:
  pass
import numpy as np
import tensorflow as tf
from tensorflow.python.tools import saved_model_cli

in_file, out_file, *exports = sys.argv[1:]
inputs = dict(np.load(in_file, allow_pickle=True))
out = {}
for name, path in zip(exports[::2], exports[1::2]):
  sigs = tf.saved_model.load(path).signatures
  for key in ("a", "b"):
    for k, v in sigs["serving_default"](images=tf.constant(inputs[key])).items():
      out[f"{name}/{key}/{k}"] = v.numpy()
  png = tf.constant(list(inputs["png"]), tf.string)
  for k, v in sigs["serve_image_bytes"](image_bytes=png).items():
    out[f"{name}/png/{k}"] = v.numpy()
  sys.argv = ["saved_model_cli", "show", "--dir", path, "--all"]
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    try:
      saved_model_cli.main()
    except SystemExit as e:
      assert not e.code, f"saved_model_cli exit {e.code}"
  out[f"{name}/saved_model_cli"] = np.array(text.getvalue())
assert not [m for m in sys.modules if m.split(".")[0] == "nnclr_tf"]
np.savez(out_file, **out)
"""


@pytest.fixture(scope="module")
def clean(served, tmp_path_factory):
  """(inputs, outputs) of the clean-process check over encoder/1, encoder/2 and classifier/1."""
  d = tmp_path_factory.mktemp("clean")
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (2, 21, 30, 3), dtype=np.uint8)  # resized inside the graph
  gray = rng.integers(0, 256, (12, 9, 1), dtype=np.uint8)
  png_images = [a[0], b[1], gray]
  png = np.array([tf.io.encode_png(im).numpy() for im in png_images], dtype=object)
  np.savez(d / "in.npz", a=a, b=b, png=png)
  base = served["base"]
  (d / "check.py").write_text(CLEAN_CHECK)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  args = [str(d / "in.npz"), str(d / "out.npz")]
  for name in ("encoder/1", "encoder/2", "classifier/1"):
    args += [name.replace("/", ""), os.path.join(base, name)]
  p = subprocess.run([sys.executable, "-I", str(d / "check.py"), *args], cwd=str(d), env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return dict(a=a, b=b, png_images=png_images), dict(np.load(d / "out.npz", allow_pickle=True))


@pytest.mark.slow
def test_clean_process_outputs_equal_in_memory_model(served, clean):
  """Both signatures of every export, loaded with TF only, against the restored checkpoint run
  through the eval pipeline's own preprocessing (augment.center_resize); the PNG signature on
  encoded copies (mixed sizes, one grayscale) gives the same outputs."""
  inputs, got = clean
  model = restored_model(served["model_dir"])
  with np.load(served["probe"]) as z:
    probe = {k: z[k] for k in z.files}

  def expected(images):
    x = tf.stack([augment.center_resize(tf.image.convert_image_dtype(im, tf.float32), 16)
                  for im in images])
    h, z, _ = model.embed(x)
    logits = ((h.numpy() - probe["feature_mean"]) / probe["feature_std"]) @ probe["kernel"]
    logits = logits + probe["bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return dict(features=h.numpy(), projection=z.numpy(), probabilities=e / e.sum(1, keepdims=True),
                class_ids=logits.argmax(1))

  rgb = [im if im.shape[-1] == 3 else np.repeat(im, 3, axis=-1) for im in inputs["png_images"]]
  for key, images in (("a", inputs["a"]), ("b", inputs["b"]), ("png", rgb)):
    want = expected(images)
    assert np.linalg.norm(want["projection"], axis=1) == pytest.approx(1.0, abs=1e-5)
    for name in ("encoder1", "encoder2"):
      for out in ("features", "projection"):
        np.testing.assert_allclose(got[f"{name}/{key}/{out}"], want[out], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name} {key} {out}")
    np.testing.assert_allclose(got[f"classifier1/{key}/probabilities"], want["probabilities"],
                               rtol=1e-5, atol=1e-5)
    ids = got[f"classifier1/{key}/class_ids"]
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want["class_ids"])
    np.testing.assert_array_equal(got[f"classifier1/{key}/class_names"].astype(str),
                                  CLASS_NAMES[want["class_ids"]])
  # PNG copies of the same pixels give the uint8 signature's outputs.
  for name, outs in (("encoder2", ("features", "projection")), ("classifier1", ("probabilities",))):
    for out in outs:
      np.testing.assert_allclose(got[f"{name}/png/{out}"][:2],
                                 np.stack([got[f"{name}/a/{out}"][0], got[f"{name}/b/{out}"][1]]),
                                 rtol=1e-5, atol=1e-5)


def parse_saved_model_cli(text):
  """{signature: {"inputs"|"outputs": {name: (dtype, shape)}, "method": str}}"""
  sigs, current, side = {}, None, None
  for line in text.splitlines():
    m = re.match(r"\s*signature_def\['(.+)'\]:", line)
    if m:
      current = sigs.setdefault(m.group(1), {"inputs": {}, "outputs": {}})
      continue
    m = re.match(r"\s*(inputs|outputs)\['(.+)'\] tensor_info:", line)
    if m and current is not None:
      side, name = m.groups()
      current[side][name] = [None, None]
      continue
    m = re.match(r"\s*(dtype|shape): (.+)", line)
    if m and current is not None and side:
      current[side][name][0 if m.group(1) == "dtype" else 1] = m.group(2).strip()
    m = re.match(r"\s*Method name is: (.+)", line)
    if m and current is not None:
      current["method"] = m.group(1).strip()
  return {s: {k: ({n: tuple(v) for n, v in d.items()} if isinstance(d, dict) else d)
              for k, d in sig.items()} for s, sig in sigs.items()}


@pytest.mark.slow
def test_saved_model_cli_lists_named_signatures(clean):
  _, got = clean
  images = {"images": ("DT_UINT8", "(-1, -1, -1, 3)")}
  image_bytes = {"image_bytes": ("DT_STRING", "(-1)")}
  outputs = {
      "encoder2": {"features": ("DT_FLOAT", f"(-1, {FEATURE_DIM})"),
                   "projection": ("DT_FLOAT", "(-1, 16)")},
      "classifier1": {"probabilities": ("DT_FLOAT", f"(-1, {len(CLASS_NAMES)})"),
                      "class_ids": ("DT_INT64", "(-1)"), "class_names": ("DT_STRING", "(-1)")},
  }
  for version, outs in outputs.items():
    text = str(got[f"{version}/saved_model_cli"])
    sigs = parse_saved_model_cli(text)
    for name, inputs in (("serving_default", images), ("serve_image_bytes", image_bytes)):
      assert sigs[name] == {"inputs": inputs, "outputs": outs,
                            "method": "tensorflow/serving/predict"}, (version, name, text)


@pytest.mark.slow
def test_warmup_records_match_signatures(served):
  from tensorflow_serving.apis import prediction_log_pb2
  for version in ("encoder/2", "classifier/1"):
    path = os.path.join(served["base"], version)
    loaded = tf.saved_model.load(path)
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(os.path.join(path, export.WARMUP_FILE))]
    assert len(records) >= 4
    assert {r.predict_log.request.model_spec.signature_name for r in records} == {
        "serving_default", "serve_image_bytes"}
    for r in records:
      request = r.predict_log.request
      assert request.model_spec.name == version.split("/")[0]
      fn = loaded.signatures[request.model_spec.signature_name]
      spec = fn.structured_input_signature[1]
      assert set(request.inputs) == set(spec)
      feed = {}
      for key, proto in request.inputs.items():
        assert tf.dtypes.as_dtype(proto.dtype) == spec[key].dtype
        value = tf.make_ndarray(proto)
        assert spec[key].shape.is_compatible_with(value.shape)
        feed[key] = tf.constant(value, spec[key].dtype)
      n = next(iter(feed.values())).shape[0]
      assert all(v.shape[0] == n for v in fn(**feed).values())


def tiny_model(seed=3):
  return NNCLR(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
               pred_hidden_dim=32, embedding_dim=16, global_bn=False, queue_size=64, seed=seed)


def test_crash_mid_export_leaves_no_version(tmp_path, monkeypatch):
  """(A second export leaving version 1 intact is checked end to end in `served`.)"""
  model = tiny_model()
  base = str(tmp_path / "export")
  os.makedirs(os.path.join(base, "encoder", "1"))
  with pytest.raises(export.ExportError, match="already exists"):
    export.export_encoder(model, base, version=1)
  (tmp_path / "file").write_text("")
  with pytest.raises(export.ExportError, match="cannot write exports under"):
    export.export_encoder(model, str(tmp_path / "file" / "export"))

  def crash(export_dir, model_name, image_size):
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))  # mid-way, not before
    raise RuntimeError("injected crash in the writer")

  monkeypatch.setattr(export, "_write_warmup", crash)
  with pytest.raises(RuntimeError, match="injected"):
    export.export_encoder(model, base)
  assert os.listdir(os.path.join(base, "encoder")) == ["1"]  # no version 2, no temp folder
  assert os.listdir(os.path.join(base, "encoder", "1")) == []


def test_warmup_is_skipped_without_serving_api(tmp_path, monkeypatch):
  monkeypatch.setattr(export, "predict_pb2", None)  # what its module-level import leaves
  export._write_warmup(str(tmp_path), "encoder", 16)
  assert os.listdir(tmp_path) == []


def test_preprocess_is_the_eval_transform():
  images = np.random.default_rng(2).integers(0, 256, (2, 21, 30, 3), dtype=np.uint8)
  want = np.stack([augment.center_resize(tf.image.convert_image_dtype(im, tf.float32), 16)
                   for im in images])
  np.testing.assert_array_equal(export.preprocess(tf.constant(images), 16).numpy(), want)


def test_probe_file_is_validated(tmp_path):
  model = tiny_model()
  path = str(tmp_path / "probe.npz")
  write_probe(path, bias=np.zeros(3, np.float32))
  with pytest.raises(export.ExportError, match=r"bias \(3,\) \(want \(10,\)\)"):
    export.load_probe(path)
  np.savez(path, kernel=np.zeros((FEATURE_DIM, 10), np.float32))
  with pytest.raises(export.ExportError, match="missing bias, class_names, feature_mean"):
    export.load_probe(path)
  write_probe(path, dim=FEATURE_DIM + 1)
  with pytest.raises(export.ExportError, match="33-d features but the backbone gives 32-d"):
    export.export_classifier(model, path, str(tmp_path / "export"))
  write_probe(path, image_size=32)
  with pytest.raises(export.ExportError, match="image_size 32"):
    export.export_classifier(model, path, str(tmp_path / "export"))
  assert not os.path.exists(tmp_path / "export")
  probe = export.load_probe(write_probe(path))
  assert tuple(probe.class_names) == tuple(CLASS_NAMES) and probe.image_size == 16


def test_keras_format_round_trip(tmp_path):
  """model.save(.keras) / load_model: same weights (support set, pointer and optimizer state
  included), same outputs, and training continues identically."""
  from nnclr_tf.lars import LARS
  from nnclr_tf.schedules import WarmupCosine
  rng = np.random.default_rng(0)
  x = rng.random((32, 16, 16, 3)).astype(np.float32)
  batch = {"view1": x, "view2": x[::-1].copy(), "label": np.arange(32, dtype=np.int32) % 10}
  keras.utils.set_random_seed(0)
  model = tiny_model()
  # Eager steps: what is under test is serialisation, and tracing train_step costs seconds.
  model.compile(optimizer=LARS(WarmupCosine(peak=0.5, warmup_steps=2, total_steps=10)),
                run_eagerly=True)
  model.fit(tf.data.Dataset.from_tensors(batch).repeat(3), epochs=1, verbose=0)
  assert int(model.support_set.pointer.numpy()) == 32  # 3 batches of 32 into a queue of 64
  path = str(tmp_path / "nnclr.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, NNCLR) and loaded.get_config() == model.get_config()
  loaded.run_eagerly = True

  def state(m):
    return {v.path: v.numpy() for v in m.weights + m.optimizer.variables}

  before, after = state(model), state(loaded)
  assert before.keys() == after.keys()
  assert {"support_set/embeddings", "support_set/labels", "support_set/pointer"} <= set(after)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  for a, b in zip(model.embed(x), loaded.embed(x)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  step = tf.data.Dataset.from_tensors(batch)
  model.fit(step, epochs=1, verbose=0)
  loaded.fit(step, epochs=1, verbose=0)
  before, after = state(model), state(loaded)
  for k in before:
    np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_export_bakes_in_the_eval_crop_fraction(tmp_path):
  """An export made at crop fraction 0.875 preprocesses with it after loading (both signatures,
  encoder and classifier) and records it in assets.extra/nnclr_tf.json; the default stays 1."""
  model = tiny_model()
  base = str(tmp_path / "export")
  probe = export.load_probe(write_probe(str(tmp_path / "probe.npz")))
  enc = export.export_encoder(model, base, warmup=False, metadata={"checkpoint_step": 3},
                              crop_fraction=0.875)
  cls = export.export_classifier(model, probe, base, warmup=False, crop_fraction=0.875)
  plain = export.export_encoder(model, base, warmup=False)
  assert export.read_metadata(enc) == {"checkpoint_step": 3, "eval_crop_fraction": 0.875}
  assert export.read_metadata(cls)["eval_crop_fraction"] == 0.875
  assert export.read_metadata(plain)["eval_crop_fraction"] == 1.0
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (2, 40, 25, 3), dtype=np.uint8)
  pngs = tf.constant([tf.io.encode_png(im).numpy() for im in images])

  def features(fraction):
    return model.embed(augment.eval_transform(images, 16, fraction))[0].numpy()

  want, squashed = features(0.875), features(1.0)
  assert np.abs(want - squashed).max() > 1e-3  # the two views are told apart
  for path, want_h in ((enc, want), (plain, squashed)):
    loaded = tf.saved_model.load(path)
    for name, arg in ((export.IMAGES_SIGNATURE, {"images": tf.constant(images)}),
                      (export.BYTES_SIGNATURE, {"image_bytes": pngs})):
      got = loaded.signatures[name](**arg)["features"].numpy()
      np.testing.assert_allclose(got, want_h, rtol=1e-5, atol=1e-5, err_msg=f"{path} {name}")
  logits = (want - probe.feature_mean) / probe.feature_std @ probe.kernel + probe.bias
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  loaded = tf.saved_model.load(cls)
  for name, arg in ((export.IMAGES_SIGNATURE, {"images": tf.constant(images)}),
                    (export.BYTES_SIGNATURE, {"image_bytes": pngs})):
    np.testing.assert_allclose(loaded.signatures[name](**arg)["probabilities"].numpy(),
                               e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)


def test_two_exports_at_once_take_different_versions(tmp_path, monkeypatch):
  """Both exporters list the versions before either renames (the race): the second finds its
  version taken and moves on to the next free one; neither replaces the other."""
  base = tmp_path / "encoder"
  (base / "1").mkdir(parents=True)
  first, second = tmp_path / "a", tmp_path / "b"
  for d, name in ((first, "a"), (second, "b")):
    d.mkdir()
    (d / name).write_text(name)
  real = export.next_version
  stale = iter([2])  # what the second exporter listed before the first one landed
  assert export._move_into_place(str(first), str(base), 0) == str(base / "2")
  monkeypatch.setattr(export, "next_version", lambda b: next(stale, None) or real(b))
  assert export._move_into_place(str(second), str(base), 0) == str(base / "3")
  assert next(stale, None) is None  # the stale listing was used
  assert (base / "2" / "a").read_text() == "a" and (base / "3" / "b").read_text() == "b"


def test_a_kill_mid_export_leaves_no_temp_past_the_next_export(tmp_path):
  """What a SIGKILL mid-export leaves (a `.tmp-<host>-<pid>-encoder-*` folder of a dead pid) is
  removed by the next export; TF Serving never read it (not an integer), and the versions stay."""
  import socket
  import subprocess
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  base = str(tmp_path / "export")
  orphan = os.path.join(base, "encoder", f".tmp-{socket.gethostname()}-{child.pid}-encoder-x")
  os.makedirs(os.path.join(orphan, "variables"))
  os.makedirs(os.path.join(base, "encoder", "1"))
  export.export_encoder(tiny_model(), base)
  assert sorted(os.listdir(os.path.join(base, "encoder"))) == ["1", "2"]
