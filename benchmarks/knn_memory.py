"""Peak memory and time of the weighted kNN.

  python benchmarks/knn_memory.py [--dim=512] [--classes=10]     # CIFAR scale, float32 features
  python benchmarks/knn_memory.py --mode=bank [--bank=1000000] [--dim=2048] [--classes=1000]

Prints one JSON line. k and the vote temperature are the kNN evaluation's of the mode's preset
(--knn_k, --knn_temperature change them).

cifar: 50,000 random train features x 10,000 queries; memory and time do not depend on the values.

bank: a synthetic bank of L2-normalised float16 rows (1,000,000 x 2,048 = 4.1 GB), clustered
around one centre per class so the neighbours mean something, generated chunk-wise straight into
float16 (no float32 copy of the whole bank at any time). The peak RSS increase over the process
before the bank exists is compared with the bank's own size. A float32 reference for the first
`--ref_queries` queries, an independent full sort of their similarities to the float32 rows the
bank was rounded from (regenerated chunk by chunk from the same seeds), gives the top-1 the
float16 kNN must reproduce; it runs after the peak is read.
"""

import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import run_settings  # noqa: E402
from nnclr_tf.evaluation import knn_batch_size, knn_scores, topk_accuracy  # noqa: E402

# k and the vote temperature are the kNN evaluation's of the run each mode stands for.
MODE_PRESETS = {"cifar": "cifar10_resnet18", "bank": "imagenet_resnet50"}


def status_mb(field):
  """VmRSS / VmHWM of this process in MB (ru_maxrss where /proc is missing)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak():
  """Resets VmHWM to the current RSS, so the peak read later belongs to what follows."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def cifar(a):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(a.train, a.dim)).astype(np.float32)
  labels = rng.integers(0, a.classes, a.train)
  queries = rng.normal(size=(a.queries, a.dim)).astype(np.float32)
  rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t = time.perf_counter()
  scores = knn_scores(train, labels, queries, a.classes, k=a.k, temperature=a.temperature)
  seconds = time.perf_counter() - t
  return {
      "mode": "cifar", "train": a.train, "queries": a.queries, "dim": a.dim,
      "classes": a.classes, "k": a.k, "batch_size": knn_batch_size(a.train),
      "seconds": round(seconds, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "rss_after_inputs_mb": round(rss_inputs),
      "inputs_mb": round((train.nbytes + queries.nbytes) / 2 ** 20),
      "scores_shape": list(scores.shape)}


def clustered_rows(centres, labels, noise, seed):
  """Unit rows around the labels' centres, float32, reproducible from `seed`."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((len(labels), centres.shape[1]), dtype=np.float32)
  x *= noise
  x += centres[labels]
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def bank(a):
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((a.classes, a.dim), dtype=np.float32)
  labels = rng.integers(0, a.classes, a.bank).astype(np.int32)
  query_labels = rng.integers(0, a.classes, a.queries).astype(np.int32)
  queries = clustered_rows(centres, query_labels, a.noise, [1, 0])
  starts = range(0, a.bank, a.chunk)

  rss_before = status_mb("VmRSS")
  exact_peak = reset_peak()
  t = time.perf_counter()
  feats = np.empty((a.bank, a.dim), np.float16)
  for i, s in enumerate(starts):
    feats[s:s + a.chunk] = clustered_rows(centres, labels[s:s + a.chunk], a.noise, [2, i])
  gen_seconds = time.perf_counter() - t
  t = time.perf_counter()
  scores = knn_scores(feats, labels, queries, a.classes, k=a.k, temperature=a.temperature,
                      bank_chunk=a.chunk)
  knn_seconds = time.perf_counter() - t
  peak_increase = status_mb("VmHWM") - rss_before
  del feats

  # Float32 reference, by a different route: every similarity kept, fully sorted.
  t = time.perf_counter()
  ref_q = queries[:a.ref_queries]
  sims = np.empty((len(ref_q), a.bank), np.float32)
  for i, s in enumerate(starts):
    sims[:, s:s + a.chunk] = ref_q @ clustered_rows(centres, labels[s:s + a.chunk], a.noise,
                                                     [2, i]).T
  ref_scores = np.zeros((len(ref_q), a.classes))
  for r in range(len(ref_q)):
    top = np.argsort(-sims[r], kind="stable")[:a.k]
    np.add.at(ref_scores[r], labels[top], np.exp(sims[r, top].astype(np.float64) / a.temperature))
  ref_seconds = time.perf_counter() - t

  bank_mb = a.bank * a.dim * 2 / 2 ** 20
  agree = np.argmax(scores[:len(ref_q)], 1) == np.argmax(ref_scores, 1)
  return {
      "mode": "bank", "bank": a.bank, "dim": a.dim, "queries": a.queries, "classes": a.classes,
      "k": a.k, "noise": a.noise, "bank_chunk": a.chunk,
      "query_batch": knn_batch_size(min(a.chunk, a.bank)),
      "bank_float16_mb": round(bank_mb), "rss_before_bank_mb": round(rss_before),
      "peak_increase_mb": round(peak_increase),
      "peak_increase_over_bank": round(peak_increase / bank_mb, 3),
      "peak_is_exact": exact_peak,
      "generate_seconds": round(gen_seconds, 1), "knn_seconds": round(knn_seconds, 1),
      "reference_seconds": round(ref_seconds, 1),
      "knn_top1": topk_accuracy(scores, query_labels, 1),
      "knn_top5": topk_accuracy(scores, query_labels, 5),
      "ref_queries": len(ref_q), "ref_top1_agree": int(agree.sum()),
      "ref_top1_equal": bool(agree.all()),
      "ref_knn_top1": topk_accuracy(ref_scores, query_labels[:len(ref_q)], 1)}


def parser():
  ap = run_settings.Parser(lambda args, given: MODE_PRESETS[args.mode],
                           ("knn_k", "knn_temperature"),
                           aliases={"knn_k": ["--k"], "knn_temperature": ["--temperature"]},
                           description=__doc__.splitlines()[0])
  ap.add_argument("--mode", choices=sorted(MODE_PRESETS), default="cifar",
                  help="the kNN settings are the preset's: cifar10_resnet18 (cifar) or "
                       "imagenet_resnet50 (bank)")
  ap.add_argument("--train", type=int, default=50_000)
  ap.add_argument("--queries", type=int, default=None,
                  help="default 10,000 (cifar), 1,000 (bank)")
  ap.add_argument("--dim", type=int, default=None, help="default 512 (cifar), 2,048 (bank)")
  ap.add_argument("--classes", type=int, default=None, help="default 10 (cifar), 1,000 (bank)")
  ap.add_argument("--bank", type=int, default=1_000_000)
  ap.add_argument("--chunk", type=int, default=32_768, help="bank rows per chunk")
  ap.add_argument("--noise", type=float, default=6.0, help="per-dimension noise around centres")
  ap.add_argument("--ref_queries", type=int, default=200)
  return ap


def main(argv=None):
  a, exp = parser().parse(argv)
  a.k, a.temperature = exp.eval.knn_k, exp.eval.knn_temperature
  big = a.mode == "bank"
  a.queries = a.queries or (1_000 if big else 10_000)
  a.dim = a.dim or (2_048 if big else 512)
  a.classes = a.classes or (1_000 if big else 10)
  print(json.dumps(bank(a) if big else cifar(a)))


if __name__ == "__main__":
  main()
