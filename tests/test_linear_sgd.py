"""--linear_protocol=sgd (nnclr_tf/linear_sgd.py): the streamed SGD linear protocol.

In this process, on digits with a tiny random-init encoder: a fit crashed at a step and rerun
resumes and ends where an uninterrupted fit ends, 1 and 2 replicas agree, the encoder stays
frozen, and bad settings are one ConfigError line. Through run.py on a briefly pretrained
model_dir: linear_eval with each protocol, the two within a few points, and the exported
classifier of the SGD fit computing Probe.logits.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tolerances
from conftest import REPO, mirrored
from nnclr_tf import data, linear_sgd
from nnclr_tf.config import AugmentConfig, Experiment
from nnclr_tf.errors import ConfigError
from nnclr_tf.linear_probe import load_probe
from nnclr_tf.model import NNCLR
from run_helpers import CrashAfter

TINY = dict(backbone="small_cnn", image_size=16, width=8, proj_hidden_dim=32, proj_layers=2,
            pred_hidden_dim=32, embedding_dim=16, queue_size=64)
AUG = AugmentConfig(crop_scale=(0.4, 1.0), flip_prob=0.5)


@pytest.fixture(scope="module")
def digits():
  return data.split_balanced(data.digits_source(), 297, 0)


def encoder(strategy=None, seed=7):
  keras.utils.set_random_seed(seed)
  with (strategy or tf.distribute.get_strategy()).scope():
    return NNCLR(seed=seed, **TINY).encoder


def fit(digits, out_dir, strategy=None, epochs=2, callbacks=(), **kw):
  train, held = digits
  return linear_sgd.fit(encoder(strategy), train, held, 10, 16, AUG, str(out_dir),
                        learning_rate=1.0, epochs=epochs, batch_size=128, seed=3,
                        strategy=strategy, callbacks=callbacks, **kw)


def saved(out_dir):
  """The fit's newest checkpoint, and its start: every float zero (the head is zero-initialised
  and the momentum starts at 0)."""
  state = tolerances.checkpoint(str(out_dir))
  return {k: np.zeros_like(v) for k, v in state.items()}, state



def test_crashed_fit_resumes_and_ends_as_an_uninterrupted_one(digits, tmp_path, record_property):
  """22 steps (2 epochs of 11), a save every 4: crashed after step 15, the rerun restores step 12
  (mid-epoch), re-reads the stream from there and ends as the fit that was never stopped."""
  _, whole = fit(digits, tmp_path / "whole", checkpoint_every_steps=4)
  with pytest.raises(RuntimeError, match="crash at step 15"):
    fit(digits, tmp_path / "crashed", checkpoint_every_steps=4, callbacks=[CrashAfter(15)])
  probe, resumed = fit(digits, tmp_path / "crashed", checkpoint_every_steps=4)
  assert resumed["resumed_from_step"] == 12 and whole["resumed_from_step"] == 0
  assert resumed["steps"] == whole["steps"] == 22
  init, a = saved(tmp_path / "whole")
  _, b = saved(tmp_path / "crashed")
  assert int(a["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == 22
  record_property("divergence", tolerances.divergence(init, a, b))
  tolerances.assert_trained_close(init, a, b)
  assert resumed["linear_top1"] == pytest.approx(whole["linear_top1"], abs=2 / 297)
  # The probe is the head as it was saved: raw features, no standardisation.
  np.testing.assert_array_equal(probe.kernel, b["model/_kernel/.ATTRIBUTES/VARIABLE_VALUE"])
  assert not probe.feature_mean.any() and np.all(probe.feature_std == 1)
  # A finished fit rerun does no step.
  _, again = fit(digits, tmp_path / "whole", checkpoint_every_steps=4)
  assert again["resumed_from_step"] == 22 and again["linear_top1"] == whole["linear_top1"]


def test_one_and_two_replicas_agree(digits, tmp_path, record_property):
  """The global batch of each step is the same on 1 and 2 replicas (the positional stream), and
  the gradient is its mean either way."""
  fit(digits, tmp_path / "one", epochs=1)
  fit(digits, tmp_path / "two", strategy=mirrored(2), epochs=1)
  init, a = saved(tmp_path / "one")
  _, b = saved(tmp_path / "two")
  record_property("divergence", tolerances.divergence(init, a, b))
  tolerances.assert_trained_close(init, a, b)


def test_the_encoder_is_frozen_and_only_the_head_is_saved(digits, tmp_path):
  enc = encoder()
  before = [w.numpy() for w in enc.weights]
  train, held = digits
  linear_sgd.fit(enc, train, held, 10, 16, AUG, str(tmp_path), epochs=1, batch_size=128)
  for w0, w in zip(before, enc.weights):
    np.testing.assert_array_equal(w0, w.numpy(), err_msg=w.path)  # BN statistics included
  keys = set(tolerances.checkpoint(str(tmp_path)))
  assert {k.split("/")[1] for k in keys if k.startswith("model/")} == {"_kernel", "bias"}


def test_bad_settings_are_one_config_error_line(digits):
  for flags, match in [({"linear_protocol": "adam"}, "--linear_protocol='adam' is unknown"),
                       ({"linear_lr": 0.0}, "--linear_lr=0.0 must be"),
                       ({"linear_epochs": 0}, "--linear_epochs=0 must be >= 1"),
                       ({"linear_batch_size": 0}, "--linear_batch_size=0 must be >= 1")]:
    with pytest.raises(ConfigError, match=match):
      Experiment().replace(**flags)
  with pytest.raises(ConfigError, match="--linear_batch_size=4096 is larger than the 1500 "):
    linear_sgd.check_batch(4096, 1500, 1)
  with pytest.raises(ConfigError, match="--linear_batch_size=127 must be divisible by the 2 "):
    linear_sgd.check_batch(127, 1500, 2)


def test_presets_name_their_protocol():
  """SimCLR's settings in the ImageNet preset, batch 256 on STL-10's 5,000 labelled images, the
  in-memory default elsewhere (each preset's header says why)."""
  got = {name: Experiment.from_flagfile(name).probe for name in (
      "imagenet_resnet50", "stl10_resnet18", "cifar10_resnet18", "cifar10_resnet18_lightly",
      "quickstart")}
  p = got.pop("imagenet_resnet50")
  assert (p.linear_protocol, p.linear_lr, p.linear_epochs, p.linear_batch_size) == (
      "sgd", 0.1, 90, 4096)
  p = got.pop("stl10_resnet18")
  assert (p.linear_protocol, p.linear_lr, p.linear_epochs, p.linear_batch_size) == (
      "sgd", 0.1, 90, 256)
  assert {p.linear_protocol for p in got.values()} == {"lbfgs"}


# --- through run.py ----------------------------------------------------------------------------

QS = ["--flagfile=flags/quickstart.cfg", "--proj_hidden_dim=64", "--pred_hidden_dim=64",
      "--width=16", "--verbose=0", "--noplots"]
# Digits at 16 px: a mild crop (0.4 loses whole strokes of an 8 x 8 digit), and an lr for raw
# features of std ~0.1 (the L-BFGS protocol standardises them; this one does not).
SGD = ["--linear_protocol=sgd", "--linear_epochs=30", "--linear_batch_size=64",
       "--linear_lr=10", "--crop_min_scale=0.8"]


def run(args):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  p = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *QS, *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """A model_dir pretrained 22 steps, then linear_eval with sgd (its probe kept aside) and with
  lbfgs: (model_dir, sgd results, sgd probe path, lbfgs results)."""
  d = str(tmp_path_factory.mktemp("linear") / "m")
  run([f"--model_dir={d}", "--train_epochs=2"])
  sgd = run([f"--model_dir={d}", "--mode=linear_eval", *SGD])
  probe = os.path.join(os.path.dirname(d), "sgd_probe.npz")
  shutil.copy(sgd["probe"], probe)
  lbfgs = run([f"--model_dir={d}", "--mode=linear_eval"])
  return d, sgd, probe, lbfgs


@pytest.mark.slow
def test_sgd_linear_eval_through_the_cli(both):
  d, r, probe_path, _ = both
  assert r["protocol"] == "sgd" and r["feature_cache"] is None
  assert r["steps"] == 30 * (1500 // 64) and r["batch_size"] == 64
  assert r["learning_rate"] == pytest.approx(10 * 64 / 256)
  assert r["eval_examples"] == 297 and r["linear_top5"] >= r["linear_top1"] > 0.8
  assert "linear_top1_random_init" not in r  # not fitted under sgd (it would repeat the fit)
  assert glob.glob(os.path.join(r["sgd_dir"], "ckpt-*.index"))
  probe = load_probe(probe_path)
  assert probe.kernel.shape == (64, 10) and probe.image_size == 16
  meta = json.load(open(os.path.join(r["classifier_export_dir"], "assets.extra",
                                     "nnclr_tf.json")))
  assert meta["linear_eval"]["protocol"] == "sgd"
  # The probe on the raw features pretraining's kNN cached reproduces the reported top-1.
  (cache,) = glob.glob(os.path.join(d, "features", "ckpt-22-*.npz"))
  with np.load(cache) as z:
    pred = probe.logits(z["eval_features"]).argmax(1)
    assert np.mean(pred == z["eval_labels"]) == pytest.approx(r["linear_top1"], abs=1 / 297)


@pytest.mark.slow
def test_sgd_and_lbfgs_agree_on_digits(both, record_property):
  """The same encoder, the two protocols: within 5 points (measured: see the closing note of
  the change that added this test)."""
  _, sgd, _, lbfgs = both
  assert lbfgs["protocol"] == "lbfgs" and lbfgs["converged"]
  gap = abs(sgd["linear_top1"] - lbfgs["linear_top1"])
  record_property("sgd_top1", sgd["linear_top1"])
  record_property("lbfgs_top1", lbfgs["linear_top1"])
  assert gap <= 0.05, (sgd["linear_top1"], lbfgs["linear_top1"])


@pytest.mark.slow
def test_exported_sgd_classifier_computes_probe_logits(both):
  """The classifier SavedModel of the SGD fit loads and its probabilities and classes are the
  softmax and argmax of Probe.logits of the exported encoder's features (same checkpoint)."""
  d, r, probe_path, _ = both
  probe = load_probe(probe_path)
  images = np.random.default_rng(0).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
  features = tf.saved_model.load(os.path.join(d, "export", "encoder", "1")).signatures[
      "serving_default"](images=tf.constant(images))["features"].numpy()
  out = tf.saved_model.load(r["classifier_export_dir"]).signatures["serving_default"](
      images=tf.constant(images))
  logits = probe.logits(features).astype(np.float64)
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  want, got = e / e.sum(axis=1, keepdims=True), out["probabilities"].numpy()
  # Relative, in log space: the head's logits span tens of units, so most probabilities are far
  # below any absolute tolerance (a head without its bias differed in 1 of 50 at atol 1e-6).
  live = want > 1e-30
  np.testing.assert_allclose(np.log(got[live]), np.log(want[live]), atol=1e-3)
  assert np.all(got[~live] < 1e-29)
  np.testing.assert_array_equal(out["class_ids"].numpy(), logits.argmax(1))


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_training_set():
  """benchmarks/linear_memory.py on 2,000 and 8,000 image files, each in its own process: the
  peak RSS of the fit stays within 10% (the set is read lazily, a few batches at a time)."""
  peaks, growth = {}, {}
  for n in (2000, 8000):
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "linear_memory.py"),
                        f"--images={n}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["steps"] == n // 128
    peaks[n] = r["peak_rss_mb"]
    if r["peak_is_of_the_fit"]:
      growth[n] = r["peak_rss_mb"] - r["rss_before_fit_mb"]
  assert peaks[8000] <= 1.1 * peaks[2000], peaks
  # TensorFlow's ~700 MB hide growth below ~70 MB from the totals; what the fit adds shows it
  # (measured 59 and 60 MB; with every view held as float32 it was 83 and 153 MB, which the
  # totals above let through).
  if len(growth) == 2:
    assert growth[8000] <= 1.1 * growth[2000] + 5, growth


@pytest.mark.slow
def test_kill_mid_fit_then_the_same_command_resumes(both, tmp_path, record_property):
  """kill -9 of run.py --mode=linear_eval once the fit has saved a checkpoint (the first epoch
  ends at step 23, before --checkpoint_every_steps=50), then the same command: it resumes from
  the newest checkpoint and ends where the uninterrupted fit of `both` (same encoder, data and
  settings, another model_dir) ended."""
  d, whole, _, _ = both
  copy = str(tmp_path / "m")
  shutil.copytree(d, copy, ignore=shutil.ignore_patterns("linear_probe", "export"))
  args = [*QS, f"--model_dir={copy}", "--mode=linear_eval", *SGD, "--checkpoint_every_steps=50"]
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pattern = os.path.join(copy, linear_sgd.FOLDER, "*", "ckpt-*.index")
  try:
    for _ in range(1200):
      if glob.glob(pattern) or proc.poll() is not None:
        break
      time.sleep(0.05)
  finally:
    proc.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    proc.wait()
  assert proc.returncode == -9, "the fit ended before it could be killed"
  r = run(args)
  assert 0 < r["resumed_from_step"] < r["steps"] == whole["steps"]
  a, b = tolerances.checkpoint(whole["sgd_dir"]), tolerances.checkpoint(r["sgd_dir"])
  init = {k: np.zeros_like(v) for k, v in a.items()}
  record_property("divergence", tolerances.divergence(init, a, b))
  tolerances.assert_trained_close(init, a, b)
  assert r["linear_top1"] == pytest.approx(whole["linear_top1"], abs=1 / 297)


@pytest.mark.slow
def test_the_protocols_benchmark_reports_what_the_mode_computes(both, tmp_path, capsys):
  """benchmarks/linear_protocols.py on the fixture's model_dir: its lbfgs row and its sgd row of
  the fixture's settings are the fixture's own linear_eval results (same checkpoint, same flags,
  each fit deterministic), and each run has its wall time and peak memory."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import linear_protocols
  d, sgd, _, lbfgs = both
  before = {n: os.path.getmtime(os.path.join(d, n)) for n in os.listdir(d)}
  linear_protocols.main([f"--model_dir={d}", "--flagfile=flags/quickstart.cfg",
                         "--linear_epochs=30", f"--workdir={tmp_path / 'w'}",
                         *(f"--run_flag={f}" for f in QS[1:]),
                         "--sgd_variant=" + " ".join(f for f in SGD[1:] if "epochs" not in f)])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = {r["run"]: r for r in out["runs"]}
  assert set(rows) == {"lbfgs", "sgd", "sgd_1"}
  assert rows["lbfgs"]["linear_top1"] == lbfgs["linear_top1"]
  assert rows["sgd_1"]["linear_top1"] == sgd["linear_top1"]
  assert rows["sgd_1"]["steps"] == sgd["steps"] and rows["sgd"]["batch_size"] == 256
  for r in rows.values():
    assert r["wall_seconds"] > 0 and 200 < r["peak_rss_mb"] < 8000, r
  # The model_dir itself is only copied: nothing in it is written.
  assert {n: os.path.getmtime(os.path.join(d, n)) for n in os.listdir(d)} == before
