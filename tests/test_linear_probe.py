import numpy as np
import pytest

from nnclr_tf.linear_probe import Probe, evaluate_probe, fit_probe, load_probe, save_probe


def separable(n, num_classes=5, dim=24, seed=0, scale=100.0, shift=3.0):
  """Linearly separable by construction: class c has a +3 margin on dimension c (first
  num_classes dims are a one-hot-ish code), plus noise dims, all with a large offset and scale so
  the probe must standardise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  x = rng.uniform(-1, 1, size=(n, dim))
  x[np.arange(n), y] += shift
  return (x * scale + 50.0).astype(np.float32), y


def test_probe_reaches_95_percent_on_separable_features():
  x, y = separable(600)
  xt, yt = separable(300, seed=1)
  probe, info = fit_probe(x, y, 5, image_size=16, seed=0)
  r = evaluate_probe(probe, xt, yt)
  assert r["top1"] >= 0.95, (r, info)
  assert r["top5"] == 1.0
  assert info["converged"] and info["l2"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  assert set(info["l2_val_top1"]) == {"1e-05", "0.0001", "0.001", "0.01", "0.1"}


def test_probe_matches_sklearn_on_standardised_features():
  """The stored formula ((f - mean) / std) @ kernel + bias reproduces sklearn's decision."""
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(3)
  x = rng.normal(size=(200, 8)).astype(np.float32) * 4 + 2
  y = rng.integers(0, 3, 200)
  probe, info = fit_probe(x, y, 3, l2=[1e-2])
  xs = (x - x.mean(0)) / x.std(0)
  clf = LogisticRegression(C=1 / (1e-2 * 200), max_iter=1000, tol=1e-6).fit(xs, y)
  np.testing.assert_allclose(probe.logits(x), clf.decision_function(xs), rtol=1e-3, atol=1e-3)
  assert info["l2"] == 1e-2 and info["l2_val_top1"] == {}


def test_binary_missing_classes_and_unknown_labels():
  x, y = separable(300, num_classes=2)
  y = np.where(y == 1, 3, y)               # classes 0 and 3 of 5 present
  y_unknown = y.copy()
  y_unknown[:50] = -1                      # unknown labels are ignored
  probe, info = fit_probe(x, y_unknown, 5, l2=[1e-3])
  assert probe.kernel.shape == (24, 5) and info["train_examples"] == 250
  pred = probe.logits(x).argmax(1)
  assert set(np.unique(pred)) <= {0, 3}
  assert np.mean(pred == y) > 0.95


def test_save_load_round_trip(tmp_path):
  x, y = separable(200, num_classes=3, dim=6)
  probe, _ = fit_probe(x, y, 3, class_names=["cat", "dog", "émeu"], image_size=32, l2=[1e-3])
  path = save_probe(str(tmp_path / "linear_probe" / "probe.npz"), probe)
  back = load_probe(path)
  for field in ("kernel", "bias", "feature_mean", "feature_std"):
    got = getattr(back, field)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, getattr(probe, field))
  assert list(back.class_names) == ["cat", "dog", "émeu"] and back.image_size == 32
  assert isinstance(back.image_size, int)
  with np.load(path, allow_pickle=False) as z:  # the contract: these names, no pickled objects
    assert set(z.files) == {"kernel", "bias", "feature_mean", "feature_std", "class_names",
                            "image_size"}
    assert z["kernel"].shape == (6, 3) and z["image_size"].shape == ()
  np.testing.assert_allclose(back.logits(x), probe.logits(x))


def test_load_refuses_inconsistent_files(tmp_path):
  bad = Probe(kernel=np.zeros((4, 3), np.float32), bias=np.zeros(2, np.float32),
              feature_mean=np.zeros(4, np.float32), feature_std=np.ones(4, np.float32),
              class_names=np.array(["a", "b", "c"]), image_size=8)
  with pytest.raises(ValueError, match="inconsistent"):
    save_probe(str(tmp_path / "p.npz"), bad)
  np.savez(str(tmp_path / "q.npz"), kernel=np.zeros((4, 3)))
  with pytest.raises(ValueError, match="missing"):
    load_probe(str(tmp_path / "q.npz"))
