"""Reliability: resume after kill -9, atomic checkpoints, the NaN/Inf guard, the bad-input
matrix (one clear line, exit code 2, or a counted skip) and --deterministic.

Fast cases run in-process against the library or `run.run_main` with absl flags parsed by hand;
run.py subprocesses are used only where the process itself (kill -9, exit code, a second process
for determinism) is the behaviour."""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO
from nnclr_tf import (
  checkpoints,
  data,
  scoring,
  training,
)
from nnclr_tf import model_dir as model_dir_lib  # noqa: E402
from nnclr_tf.config import (
  AugmentConfig,
  DataConfig,
  Experiment,  # noqa: E402
  OptimConfig,
  TrainConfig,
)
from nnclr_tf.model import NNCLR
from run_helpers import CrashAfter, run_cli

AUG = AugmentConfig(flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=(0, 0),
                    solarize_prob=(0, 0), crop_scale=(0.4, 1.0))
TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64, temperature=0.1)
TINY_FLAGS = ["--val_images=0", "--width=8", "--proj_hidden_dim=32", "--pred_hidden_dim=32",
              "--embedding_dim=16", "--batch_size=32", "--queue_size=256", "--verbose=0"]
QUICKSTART = os.path.join(REPO, "flags", "quickstart.cfg")


# ------------------------------------------------------------------------------------------------
# Helpers

def build(seed=7, **kw):
  keras.utils.set_random_seed(seed)
  return NNCLR(seed=seed, **{**TINY, **kw})


OPTIM = OptimConfig(optimizer="lars", learning_rate=0.5, weight_decay=1e-4, warmup_epochs=1)


def _train_cfg(model_dir, steps, every=0, batch=16, seed=7, keep=5):
  return TrainConfig(model_dir=str(model_dir), batch_size=batch, train_steps=steps, seed=seed,
                     checkpoint_every_steps=every, keep_checkpoints=keep, verbose=0)


def fit(model, source, model_dir, steps, every=0, batch=16, seed=7, keep=5):
  return training.pretrain(model, tf.distribute.get_strategy(), source, DataConfig(image_size=16),
                           AUG, _train_cfg(model_dir, steps, every, batch, seed, keep), OPTIM)


def compiled(model, total=16, spe=4):
  """`model` compiled with the test optimizer, its slots built, without tracing a train step."""
  with tf.distribute.get_strategy().scope():
    model.compile(optimizer=training.build_optimizer(OPTIM, model.trainable_variables, 16, total,
                                                     spe))
    model.optimizer.build(model.trainable_variables)
  return model


def save_at(model, model_dir, step):
  """A checkpoint of `model` as CheckpointCallback writes it at `step`."""
  model.optimizer.iterations.assign(step)
  tf.train.CheckpointManager(checkpoints.make_checkpoint(model), str(model_dir),
                             max_to_keep=5).save(checkpoint_number=step)


def checkpoint_tensors(path):
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def assert_same_checkpoint(a_path, b_path):
  """Every tensor of two checkpoints bit for bit (save_counter aside: it counts saves)."""
  a, b = checkpoint_tensors(str(a_path)), checkpoint_tensors(str(b_path))
  assert a.keys() == b.keys()
  for k in a:
    if "save_counter" not in k:
      np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def checkpoint_steps(model_dir):
  return sorted(int(f[5:-6]) for f in os.listdir(model_dir)
                if f.startswith("ckpt-") and f.endswith(".index"))


def file_bytes(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
  return out


@pytest.fixture
def spawn(tmp_path):
  """Starts run.py processes (output to files, so an unread pipe cannot block them); any still
  running when the test ends, passed or failed, is killed with its process group."""
  procs = []

  def start(args, ignore_sigxfsz=False):
    log = tmp_path / f"proc{len(procs)}"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # An ignored SIGXFSZ makes a write past RLIMIT_FSIZE fail with EFBIG, like a full disk,
    # instead of killing the process.
    pre = (lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)) if ignore_sigxfsz else None
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
      p = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=REPO,
                           env=env, stdout=out, stderr=err, start_new_session=True,
                           preexec_fn=pre)
    p.log = log
    procs.append(p)
    return p

  yield start
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)


def finish(proc, timeout=240):
  """(exit code, stdout, stderr) of a process from `spawn`; killed if it overruns `timeout`."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    raise
  with open(f"{proc.log}.out") as out, open(f"{proc.log}.err") as err:
    return proc.returncode, out.read(), err.read()


@pytest.fixture
def cli(capsys):
  """Runs the CLI's parse + run_main in this process: returns (exit code, the `error:` lines)."""
  return lambda *args: run_cli(capsys, *args)[:2]


# ------------------------------------------------------------------------------------------------
# 1. Crash and resume

@pytest.mark.slow
def test_restored_state_equals_the_checkpoint_bit_for_bit(tmp_path):
  """Every tensor in the checkpoint (weights, BN statistics, LARS momenta, step, support set rows,
  labels and pointer) comes back bit for bit in a model built with another seed; the LR schedule
  resumes at the saved step."""
  source = data.digits_source()
  model = build()
  fit(model, source, tmp_path / "a", steps=5)
  assert checkpoint_steps(tmp_path / "a") == [5]
  saved = checkpoint_tensors(str(tmp_path / "a" / "ckpt-5"))

  again = build(seed=99)
  with tf.distribute.get_strategy().scope():
    again.compile(optimizer=training.build_optimizer(
        OPTIM, again.trainable_variables, 16, 5, source_spe(source)))
    again.optimizer.build(again.trainable_variables)
  assert not np.array_equal(again.support_set.embeddings.numpy(),
                            model.support_set.embeddings.numpy())
  assert checkpoints.restore_latest(again, str(tmp_path / "a")).endswith("ckpt-5")
  # Oracle: the file. Writing the restored objects again must give the same tensors, key by key.
  checkpoints.make_checkpoint(again).write(str(tmp_path / "b" / "re"))
  rewritten = checkpoint_tensors(str(tmp_path / "b" / "re"))
  values = {k for k in saved if k.endswith("VARIABLE_VALUE") and "save_counter" not in k}
  assert len(values) >= len(again.weights) + len(again.optimizer.variables) - 1
  for k in values:
    np.testing.assert_array_equal(rewritten[k], saved[k], err_msg=k)
  assert int(again.optimizer.iterations.numpy()) == 5
  assert int(again.support_set.pointer.numpy()) == 5 * 16 % 64
  np.testing.assert_array_equal(again.support_set.embeddings.numpy(),
                                model.support_set.embeddings.numpy())
  assert float(again.optimizer.learning_rate) == float(model.optimizer.learning_rate)


def source_spe(source, batch=16):
  return data.steps_per_epoch(len(source), batch)



@pytest.mark.slow
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
  """Python API: 14 steps straight vs the same run crashed after step 7 (a checkpoint every 3
  steps, 10 steps per epoch) and resumed by a new model object built from another seed: the
  restart is mid-epoch at step 6; the data stream, support set and LR continue from there."""
  digits = data.digits_source()
  source = data.numpy_source(digits.images[:160], digits.labels[:160])
  straight = build()
  r_straight = fit(straight, source, tmp_path / "straight", steps=14)
  with pytest.raises(KeyboardInterrupt):
    training.pretrain(build(), tf.distribute.get_strategy(), source, DataConfig(image_size=16),
                      AUG, _train_cfg(tmp_path / "resumed", steps=14, every=3), OPTIM,
                      callbacks=[CrashAfter(7, KeyboardInterrupt)])
  assert checkpoint_steps(tmp_path / "resumed") == [3, 6]
  r = fit(build(seed=123), source, tmp_path / "resumed", steps=14, every=3)
  assert r["resumed_from_step"] == 6 and r["steps"] == r_straight["steps"] == 14
  assert_same_checkpoint(tmp_path / "straight" / "ckpt-14", tmp_path / "resumed" / "ckpt-14")


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
  """ckpt-12 cut to half its size (a partial copy, a disk error): the resume warns once, leaves it
  as it is, continues from ckpt-10 (the epoch end) as a resume from there does, writes step 12
  again, and ends with the tensors of an uninterrupted run bit for bit."""
  digits = data.digits_source()
  source = data.numpy_source(digits.images[:160], digits.labels[:160])
  r_straight = fit(build(), source, tmp_path / "straight", steps=16, every=4)
  d = tmp_path / "damaged"
  fit(build(), source, d, steps=12, every=4)
  data_file = d / "ckpt-12.data-00000-of-00001"
  half = data_file.read_bytes()[:data_file.stat().st_size // 2]
  data_file.write_bytes(half)
  with caplog.at_level("WARNING"):
    r = fit(build(seed=123), source, d, steps=16, every=4)
  warned = [m for m in caplog.messages if "damaged" in m]
  assert len(warned) == 1, caplog.messages
  assert "ckpt-12 is damaged (" in warned[0] and "ckpt-10, the newest intact" in warned[0]
  assert r["resumed_from_step"] == 10 and r["steps"] == r_straight["steps"] == 16
  assert checkpoints.damage(str(d / "ckpt-12")) is None  # written again on the way
  assert_same_checkpoint(tmp_path / "straight" / "ckpt-16", d / "ckpt-16")


@pytest.mark.slow
def test_knn_eval_and_export_take_the_newest_intact_checkpoint(tmp_path, spawn):
  """Every mode that restores falls back as pretraining does: knn_eval and export of a model_dir
  whose ckpt-6 is damaged score and export ckpt-4, with one warning line; with no intact
  checkpoint, one error line naming the files and exit 2."""
  d = tmp_path / "m"
  common = [f"--flagfile={QUICKSTART}", f"--model_dir={d}", *TINY_FLAGS, "--val_images=100",
            "--train_steps=6", "--checkpoint_every_steps=2", "--plots=false",
            "--random_init_baseline=false"]
  code, _, err = finish(spawn(["--mode=pretrain", *common]))
  assert code == 0, err[-2000:]
  data_file = d / "ckpt-6.data-00000-of-00001"
  data_file.write_bytes(data_file.read_bytes()[:100])
  for mode in ("knn_eval", "export"):
    code, out, err = finish(spawn([f"--mode={mode}", *common]))
    assert code == 0, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip() and "no linear probe" not in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), (mode, lines)
    assert "ckpt-6 is damaged (" in lines[0], lines
    assert "ckpt-4, the newest intact checkpoint, is used" in lines[0], lines
    results = json.loads(out.strip().splitlines()[-1])
    assert results["checkpoint"].endswith("ckpt-4"), results
  meta = json.load(open(os.path.join(results["encoder_export_dir"], "assets.extra",
                                     "nnclr_tf.json")))
  assert meta["checkpoint_step"] == 4
  for s in (2, 4):
    f = d / f"ckpt-{s}.data-00000-of-00001"
    f.write_bytes(b"")
  code, _, err = finish(spawn(["--mode=knn_eval", *common]))
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "holds no intact checkpoint: ckpt-6.* (" in lines[0] and "ckpt-2.* (" in lines[0]


def test_a_save_interrupted_at_any_point_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  """What a kill during CheckpointManager.save can leave behind, reproduced file by file: shards
  in ckpt-N_temp/, a merged data file without its index, or all files but no state-file update.
  In each case latest_checkpoint still names the previous complete checkpoint, it restores, the
  orphaned temp folder is cleaned up and the next save of the same step succeeds."""
  from tensorflow.python.checkpoint import checkpoint_management as cm
  source = data.numpy_source(data.digits_source().images[:64], data.digits_source().labels[:64])
  model = compiled(build())
  d = tmp_path / "m"
  save_at(model, d, 2)
  assert checkpoint_steps(d) == [2]

  # (a) Killed after the checkpoint files were written but before the state file was updated.
  manager = tf.train.CheckpointManager(checkpoints.make_checkpoint(model), str(d), max_to_keep=5)

  def killed(*args, **kwargs):
    raise KeyboardInterrupt("simulated kill before the state file is rewritten")

  monkeypatch.setattr(cm, "update_checkpoint_state_internal", killed)
  with pytest.raises(KeyboardInterrupt):
    manager.save(checkpoint_number=3)
  monkeypatch.undo()
  assert os.path.exists(d / "ckpt-3.index")
  assert tf.train.latest_checkpoint(str(d)).endswith("ckpt-2")
  # (b) Killed while shards were being written, and (c) mid-merge: a data file, no index.
  os.makedirs(d / "ckpt-4_temp")
  (d / "ckpt-4_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 100)
  (d / "ckpt-5.data-00000-of-00001").write_bytes(b"\0" * 10)
  assert tf.train.latest_checkpoint(str(d)).endswith("ckpt-2")
  again = build(seed=3)
  r = fit(again, source, d, steps=4, every=2)
  assert r["resumed_from_step"] == 2 and r["steps"] == 4
  assert not os.path.exists(d / "ckpt-4_temp")
  assert tf.train.latest_checkpoint(str(d)).endswith("ckpt-4")
  with open(d / "checkpoint") as f:
    state = f.read()
  assert "ckpt-3" not in state and "ckpt-5" not in state


KILL_SAVER = r"""
import os, sys, numpy as np, tensorflow as tf
d = sys.argv[1]
v = tf.Variable(np.zeros([4_000_000], np.float32))   # 16 MB: a save takes a while
step = tf.Variable(0, dtype=tf.int64)
manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v, step=step), d, max_to_keep=2)
print("ready", flush=True)
for i in range(1, 100000):
  v.assign(tf.fill([4_000_000], float(i)))
  step.assign(i)
  manager.save(checkpoint_number=i)
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save(tmp_path):
  """A real kill -9 while TF is writing a checkpoint (detected by its ckpt-N_temp folder): the
  state file still names a complete checkpoint whose tensors are consistent."""
  d = str(tmp_path / "saves")
  os.makedirs(d)
  proc = subprocess.Popen([sys.executable, "-c", KILL_SAVER, d], stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
  mid_save = False
  try:
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while time.time() < deadline:
      names = os.listdir(d)
      if any(n.endswith("_temp") for n in names) and "checkpoint" in names:
        mid_save = True
        break
      time.sleep(0.002)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  assert mid_save, "never saw a save in progress"
  latest = tf.train.latest_checkpoint(d)
  v = tf.Variable(np.zeros([4_000_000], np.float32))
  step = tf.Variable(0, dtype=tf.int64)
  tf.train.Checkpoint(v=v, step=step).restore(latest).assert_consumed()
  n = int(step.numpy())
  assert latest.endswith(f"ckpt-{n}") and n >= 1
  np.testing.assert_array_equal(v.numpy()[[0, -1]], [n, n])
  assert np.all(v.numpy() == n)


def test_every_n_steps_saves_even_when_callbacks_see_every_kth_step(tmp_path):
  """With steps_per_execution=3 the callback sees steps 3, 6, 9, 12: --checkpoint_every_steps=4
  must still save once per 4 steps (at 6, 9 and 12, the first step past each multiple)."""
  model = compiled(build())
  cb = checkpoints.CheckpointCallback(str(tmp_path), every_steps=4, keep=10)
  cb.set_model(model)
  cb.on_train_begin()
  for step in (3, 6, 9, 12):
    model.optimizer.iterations.assign(step)
    cb.on_train_batch_end(step - 1, {"loss": 1.0})
  assert checkpoint_steps(tmp_path) == [6, 9, 12]


# ------------------------------------------------------------------------------------------------
# 2. NaN / Inf guard

def _source_with_nan_at_step(step, n=64, batch=8, seed=7):
  """Digits as float images, with NaN pixels in one example that the stream serves at `step`
  (1-based) of epoch 0, found with the same index_shuffle the pipeline uses."""
  d = data.digits_source()
  images = d.images[:n].astype(np.float32) / 255.0
  position = (step - 1) * batch
  example = int(tf.random.experimental.index_shuffle(
      tf.constant(position, tf.int64), tf.constant([seed, 0], tf.int64),
      tf.constant(n - 1, tf.int64)))
  images[example, 2:5, 2:5, :] = np.nan
  return data.Source(labels=d.labels[:n], images=images, name="digits-with-nan")


@pytest.mark.slow
def test_nan_batch_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
  """NaN pixels reach the loss at step 8, the last step of epoch 0. Checkpoints every 3 steps:
  3 and 6 are written; neither the NaN step nor the epoch-end save may write; the error names
  the step and the kept checkpoint."""
  source = _source_with_nan_at_step(8)
  model = build()
  with pytest.raises(training.NonFiniteLossError) as e:
    fit(model, source, tmp_path, steps=16, every=3, batch=8)
  message = str(e.value)
  assert "step 8:" in message and "nan" in message and "ckpt-6" in message
  assert "\n" not in message
  assert checkpoint_steps(tmp_path) == [3, 6]
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")
  kept = checkpoint_tensors(str(tmp_path / "ckpt-6"))
  assert all(np.all(np.isfinite(v)) for v in kept.values()
             if isinstance(v, np.ndarray) and v.dtype.kind == "f")
  # The guard mattered: the model in memory is poisoned.
  assert not checkpoints.state_is_finite(model)


def test_checkpoint_refuses_non_finite_weights_even_with_a_finite_loss(tmp_path):
  """The loss of step s is computed before step s's update, so a blown-up update shows only in
  the weights: the save is refused and the guard trips."""
  model = compiled(build())
  save_at(model, tmp_path, 2)
  guard = training.NonFiniteGuard()
  cb = checkpoints.CheckpointCallback(str(tmp_path), every_steps=1, guard=guard)
  cb.set_model(model)
  guard.set_model(model)
  cb.on_train_begin()
  kernel = [v for v in model.trainable_variables if len(v.shape) == 4][0]
  kernel.assign(tf.fill(kernel.shape, np.inf))
  model.optimizer.iterations.assign(3)
  cb.on_train_batch_end(2, {"loss": 1.0})
  cb.on_epoch_end(0, {"loss": 1.0})
  assert guard.tripped and guard.bad_step == 3 and "non-finite" in guard.reason
  assert checkpoint_steps(tmp_path) == [2]


# ------------------------------------------------------------------------------------------------
# 3. Bad inputs: images

def _encode(array, fmt, mode=None):
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _good_folder(root, per_class=3, size=12):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      (root / c / f"{i}.png").write_bytes(
          _encode(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "PNG"))


def _jpeg():
  return _encode(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8), "JPEG")


def _corrupt_jpeg():
  """A JPEG with a valid header whose Huffman table is overwritten."""
  j = _jpeg()
  table = j.find(b"\xff\xc4")
  return j[:table + 4] + b"\xff" * 40 + j[table + 44:]


BAD_FILES = {
    "corrupt_jpeg": ("x.jpg", _corrupt_jpeg),
    "truncated_jpeg": ("x.jpg", lambda: _jpeg()[: len(_jpeg()) // 2]),
    "truncated_png": ("x.png", lambda: _encode(np.zeros((20, 20, 3), np.uint8), "PNG")[:60]),
    "zero_bytes": ("x.png", lambda: b""),
    "not_an_image": ("x.jpg", lambda: b"this is a text file with an image extension\n"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "lazy"])
def test_bad_image_is_skipped_and_counted_or_named(tmp_path, case, cached):
  name, content = BAD_FILES[case]
  _good_folder(tmp_path)
  bad = tmp_path / "b" / name
  bad.write_bytes(content())
  cfg = DataConfig(dataset="folder", image_dir=str(tmp_path), image_size=8,
                   cache_limit_mb=10 if cached else 0)
  train, _ = data.load_sources(cfg)
  assert len(train) == 6 and train.skipped == 1
  # 12 px files at image_size 8: the cache holds the files' bytes, not 8 px thumbnails.
  assert (train.encoded_images is not None) == cached == (train.paths is None)
  assert str(bad) not in [str(p) for p in (train.paths if train.paths is not None else [])]
  batch = next(iter(data.pretrain_dataset(train, AUG, 8, 6, seed=0)))
  assert np.all(np.isfinite(batch["view1"].numpy()))
  with pytest.raises(data.DataError) as e:
    data.load_sources(dataclasses.replace(cfg, skip_bad_images=False))
  assert str(e.value).startswith(f"{bad}: cannot decode (") and "--skip_bad_images" in str(e.value)


def test_mixed_modes_and_tiny_images_decode_as_rgb(tmp_path):
  """Gray, gray+alpha, RGBA, palette PNG, GIF, RGBA BMP and CMYK JPEG next to RGB, plus images
  far smaller than the crop (1x1, 2x40): all decode to the RGB pixels PIL gives (the oracle) and
  train through both the cached and the lazily decoded path."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
  files = {"rgb.png": ("PNG", None), "gray.png": ("PNG", "L"), "graya.png": ("PNG", "LA"),
           "rgba.png": ("PNG", "RGBA"), "palette.png": ("PNG", "P"), "anim.gif": ("GIF", "P"),
           "rgba.bmp": ("BMP", "RGBA"), "gray.jpg": ("JPEG", "L")}
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  for i, (name, (fmt, mode)) in enumerate(files.items()):
    (tmp_path / "ab"[i % 2] / name).write_bytes(_encode(rgb, fmt, mode))
  for name, shape in (("one.png", (1, 1, 3)), ("thin.png", (2, 40, 3))):
    (tmp_path / "a" / name).write_bytes(_encode(rng.integers(0, 255, shape, np.uint8), "PNG"))
  lazy = data.check_decodable(data.folder_source(str(tmp_path)))
  assert lazy.skipped == 0 and len(lazy) == 10
  for path in lazy.paths:
    with open(path, "rb") as f:
      raw = f.read()
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    got = data.decode_image(raw).numpy()
    tolerance = 4 if path.endswith(".jpg") else 0  # two JPEG decoders: IDCT rounding differs
    assert got.shape == expected.shape, path
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tolerance, path
  cached = data.cache_decoded(data.folder_source(str(tmp_path)), 8, 10)
  # Sizes differ from image_size: the cache holds the bytes, and every one of them decodes.
  assert cached.encoded_images.shape == (10,) and cached.skipped == 0 and cached.paths is None
  assert all(data.decode_image(b).shape[-1] == 3 for b in cached.encoded_images)
  for source in (lazy, cached):
    batch = next(iter(data.pretrain_dataset(source, AUG, 16, 10, seed=0)))
    v = batch["view1"].numpy()
    assert v.shape == (10, 16, 16, 3) and np.all(np.isfinite(v)) and 0 <= v.min() <= v.max() <= 1


def test_folder_with_only_bad_or_non_image_files(tmp_path):
  (tmp_path / "README.txt").write_text("not an image")
  with pytest.raises(data.DataError, match="holds no images"):
    data.folder_source(str(tmp_path))
  (tmp_path / "broken.jpg").write_bytes(b"")
  with pytest.raises(data.DataError) as e:
    data.load_sources(DataConfig(dataset="folder", image_dir=str(tmp_path)))
  assert "none of the 1 images" in str(e.value) and "broken.jpg" in str(e.value)


def test_one_class_folder_trains_but_knn_is_skipped(tmp_path):
  """One class sub-folder is valid for self-supervised pretraining, but a kNN score over one class
  is 100% by construction: it is skipped (logged), not reported."""
  os.makedirs(tmp_path / "only")
  for i in range(6):
    (tmp_path / "only" / f"{i}.png").write_bytes(
        _encode(np.full((8, 8, 3), 40 * i, np.uint8), "PNG"))
  train, _ = data.load_sources(DataConfig(dataset="folder", image_dir=str(tmp_path), image_size=8))
  assert train.class_names == ["only"] and train.has_labels
  assert scoring.knn_results(Experiment(), None, train, train) == {}


# ------------------------------------------------------------------------------------------------
# 3. Bad inputs: flags, model_dir, datasets (run.run_main in-process: exit code 2, one line)

def test_flag_errors_are_one_line_exit_2(tmp_path, cli):
  """(--temperature, --queue_size and --batch_size vs replicas: test_run.py, in subprocesses.)"""
  base = [f"--flagfile={QUICKSTART}", f"--model_dir={tmp_path / 'm'}", *TINY_FLAGS]
  cases = [
      ([*base, "--nn_topk=300"], "error: --nn_topk=300 must be between 1 and --queue_size=256"),
      ([*base, "--learning_rate=nan"], "error: --learning_rate=nan must be a finite number > 0"),
      ([*base, "--dataset=folder", f"--image_dir={tmp_path / 'nope'}"],
       f"error: --image_dir='{tmp_path / 'nope'}' is not a directory"),
      ([*base, "--dataset=no_such_dataset_xyz"], "error: --dataset='no_such_dataset_xyz' is not a"),
      ([*base, "--dataset=mnist", f"--data_dir={tmp_path / 'tfds'}"],
       f"error: --dataset=mnist: not prepared in --data_dir='{tmp_path / 'tfds'}'"),
      ([*base, "--keep_checkpoints=0"], "error: --keep_checkpoints=0 must be >= 1"),
      ([*base, "--bacth_size=8"],
       "error: unknown flag --bacth_size; did you mean --batch_size?"),
      ([*base, "--batch_size=abc"], "error: flag --batch_size=abc: invalid literal for int()"),
      ([*base, "--flagfile=/no/such.cfg"], "error: --flagfile: cannot open"),
  ]
  for args, expected in cases:
    code, lines = cli(*args)
    assert code == 2, (args[-1], lines)
    assert len(lines) == 1 and lines[0].startswith(expected), (args[-1], lines)


def test_typo_in_a_flagfile_names_the_file(tmp_path, cli):
  cfg = tmp_path / "mine.cfg"
  cfg.write_text(f"--flagfile={QUICKSTART}\n--lerning_rate=0.1\n")
  code, lines = cli(f"--flagfile={cfg}")
  assert code == 2
  assert lines == [f"error: unknown flag --lerning_rate in --flagfile={cfg}; did you mean "
                   "--learning_rate? see nnclr-tf --helpfull"]


def test_unwritable_model_dir(tmp_path, cli):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")  # root ignores chmod; a path below a regular file cannot be created
  code, lines = cli(f"--flagfile={QUICKSTART}", f"--model_dir={blocker / 'run'}", *TINY_FLAGS)
  assert code == 2
  assert lines == [f"error: --model_dir={blocker / 'run'} is not writable (Not a directory); "
                   "choose another"]


def test_model_dir_of_another_architecture_is_refused_untouched(tmp_path, cli):
  """A run.py model_dir (model_config.json) and a Python-API one (checkpoint only): a different
  --width is refused with one line, and no file in either folder changes or appears."""
  model = compiled(_tiny_model(width=8))
  save_at(model, tmp_path / "api", 1)
  with_config = tmp_path / "cli"
  shutil.copytree(tmp_path / "api", with_config)
  with open(with_config / "model_config.json", "w") as f:  # what run.py records
    json.dump(model.get_config(), f)
  (with_config / "flags.txt").write_text("--width=8\n")
  for d, needle in ((with_config, "holds a model with different width"),
                    (tmp_path / "api", "holds ckpt-1, which does not fit this model")):
    before = file_bytes(d)
    code, lines = cli(f"--flagfile={QUICKSTART}", f"--model_dir={d}", *TINY_FLAGS,
                      "--image_size=16", "--width=16", "--embedding_dim=16", "--queue_size=64",
                      "--proj_layers=2", "--seed=0")
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert "use a new --model_dir" in lines[0]
    assert file_bytes(d) == before
  # The same architecture is accepted, and its config recorded from then on.
  same = _tiny_model(width=8)
  checkpoints.check_checkpoint_fits(same, str(tmp_path / "api"))
  model_dir_lib.prepare(str(tmp_path / "api"), same.get_config(), checkpoint_checked=True)
  assert os.path.exists(tmp_path / "api" / "model_config.json")


def _tiny_model(width):
  return NNCLR(backbone="small_cnn", width=width, proj_hidden_dim=32, proj_layers=2,
               pred_hidden_dim=32, embedding_dim=16, queue_size=64, image_size=16,
               temperature=0.1, seed=0)


@pytest.mark.slow
def test_noskip_bad_images_names_the_file_and_skips_are_counted(tmp_path, cli, monkeypatch):
  from nnclr_tf import export
  monkeypatch.setattr(export, "export_encoder", lambda *a, **k: "not-exported")  # not the subject
  _good_folder(tmp_path / "imgs", per_class=8, size=8)
  bad = tmp_path / "imgs" / "a" / "zz.jpg"
  bad.write_bytes(b"")
  common = [f"--flagfile={QUICKSTART}", *TINY_FLAGS, "--dataset=folder",
            f"--image_dir={tmp_path / 'imgs'}", "--batch_size=8", "--queue_size=64",
            "--image_size=8", "--train_steps=1"]
  code, lines = cli(*common, f"--model_dir={tmp_path / 'strict'}", "--noskip_bad_images")
  assert code == 2
  assert lines == [f"error: {bad}: cannot decode (Input is empty.); remove or replace it, or "
                   "pass --skip_bad_images to leave unreadable images out"]
  code, lines = cli(*common, f"--model_dir={tmp_path / 'ok'}", "--knn_k=3")
  assert code == 0, lines
  with open(tmp_path / "ok" / "pretrain_results.json") as f:
    r = json.load(f)
  assert r["skipped_images"] == 1 and r["train_examples"] == 16 and r["steps"] == 1


# ------------------------------------------------------------------------------------------------
# run.py processes: kill -9 and resume, divergence exit code, determinism

KILL_FLAGS = [f"--flagfile={QUICKSTART}", *TINY_FLAGS, "--train_epochs=2", "--seed=3",
              "--keep_checkpoints=2"]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_the_same_command_resumes(tmp_path, spawn):
  """kill -9 once a mid-epoch checkpoint exists; the same command resumes from it and finishes
  with the step count, and the weights, optimizer slots and support set, of an uninterrupted run
  (run concurrently). 1797 digits / 32 = 56 steps per epoch, 112 in all."""
  straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
  straight = spawn([*KILL_FLAGS, f"--model_dir={straight_dir}"])
  victim = spawn([*KILL_FLAGS, f"--model_dir={killed_dir}", "--checkpoint_every_steps=7"])
  killed_after = None
  try:
    deadline = time.time() + 180
    while time.time() < deadline and victim.poll() is None:
      latest = tf.train.latest_checkpoint(killed_dir) if os.path.isdir(killed_dir) else None
      if latest and int(latest.rsplit("-", 1)[1]) >= 14:
        os.killpg(victim.pid, signal.SIGKILL)
        killed_after = int(latest.rsplit("-", 1)[1])
        break
      time.sleep(0.01)
  finally:
    if victim.poll() is None:
      os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
  assert killed_after is not None and victim.returncode == -signal.SIGKILL
  assert killed_after < 56, "the kill must land in epoch 0"
  assert not os.path.exists(os.path.join(killed_dir, "pretrain_results.json"))
  latest = tf.train.latest_checkpoint(killed_dir)
  resumed_from = int(latest.rsplit("-", 1)[1])
  # The state file may have moved on between the poll and the kill, never back.
  assert resumed_from >= killed_after and resumed_from % 56 and resumed_from % 7 == 0

  on_disk = checkpoint_steps(killed_dir)[-1]  # > resumed_from if the kill hit a save
  code, _, err = finish(spawn([*KILL_FLAGS, f"--model_dir={killed_dir}",
                              "--checkpoint_every_steps=7"]))
  assert code == 0, err[-3000:]
  code, _, err = finish(straight)
  assert code == 0, err[-3000:]
  with open(os.path.join(killed_dir, "pretrain_results.json")) as f:
    resumed = json.load(f)
  with open(os.path.join(straight_dir, "pretrain_results.json")) as f:
    reference = json.load(f)
  assert resumed["resumed_from_step"] == resumed_from and reference["resumed_from_step"] == 0
  assert resumed["steps"] == reference["steps"] == 112
  # The kill was in epoch 0, so both runs trained all of epoch 1, the mean loss of the results.
  assert resumed["final_loss"] == reference["final_loss"]
  assert len(checkpoint_steps(killed_dir)) == 2 and checkpoint_steps(killed_dir)[-1] == 112
  assert not [n for n in os.listdir(killed_dir) if n.endswith("_temp")]
  a = checkpoint_tensors(os.path.join(straight_dir, "ckpt-112"))
  b = checkpoint_tensors(os.path.join(killed_dir, "ckpt-112"))
  assert a.keys() == b.keys()
  for k in a:
    if "save_counter" not in k:
      np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  print(json.dumps({"state_file_at_kill": killed_after, "newest_files_at_kill": on_disk,
                    "resumed_from_step": resumed_from,
                    "steps_after_resume": resumed["steps"] - resumed_from,
                    "final_steps": resumed["steps"], "tensors_compared": len(a)}))


@pytest.mark.slow
def test_diverging_run_exits_3_and_keeps_the_last_finite_checkpoint(tmp_path, cli):
  """run.py with a learning rate of 1e30 after a 3-step warm-up: the loss turns NaN within a few
  steps; exit code 3, one line naming the step and the kept checkpoint, whose tensors are all
  finite; no results are written."""
  d = str(tmp_path / "nan")
  code, lines = cli(f"--flagfile={QUICKSTART}", *TINY_FLAGS, f"--model_dir={d}",
                    "--train_steps=20", "--checkpoint_every_steps=1", "--learning_rate=1e30",
                    "--warmup_epochs=0.05")
  assert code == 3 and len(lines) == 1, lines
  bad_step = int(lines[0].split("training stopped at step ")[1].split(":")[0])
  kept = checkpoint_steps(d)
  assert kept and kept[-1] < bad_step and f"{os.path.basename(d)}" in lines[0]
  assert f"the last checkpoint with finite weights, ckpt-{kept[-1]}, is kept" in lines[0]
  for v in checkpoint_tensors(os.path.join(d, f"ckpt-{kept[-1]}")).values():
    assert not isinstance(v, np.ndarray) or v.dtype.kind != "f" or np.all(np.isfinite(v))
  assert not os.path.exists(os.path.join(d, "pretrain_results.json"))


@pytest.mark.slow
def test_deterministic_runs_are_identical(tmp_path, spawn):
  """Two processes (run at the same time, competing for the cores), --deterministic --seed=5,
  5 steps on digits: identical loss and identical checkpoint tensors."""
  args = [f"--flagfile={QUICKSTART}", *TINY_FLAGS, "--train_steps=5", "--seed=5",
          "--deterministic"]
  procs = [spawn([*args, f"--model_dir={tmp_path / str(i)}"]) for i in range(2)]
  outs = [finish(p) for p in procs]
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  r = []
  for i in range(2):
    with open(tmp_path / str(i) / "pretrain_results.json") as f:
      r.append(json.load(f))
  assert r[0]["steps"] == r[1]["steps"] == 5
  assert r[0]["final_loss"] == r[1]["final_loss"]
  a = checkpoint_tensors(str(tmp_path / "0" / "ckpt-5"))
  b = checkpoint_tensors(str(tmp_path / "1" / "ckpt-5"))
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
