"""Peak memory and time of the batched weighted kNN at CIFAR scale (50,000 train x 10,000 queries).

  python benchmarks/knn_memory.py [--dim=512] [--classes=10]

Prints one JSON line. Features are random (memory and time do not depend on their values).
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nnclr_tf.evaluation import knn_batch_size, knn_scores  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--train", type=int, default=50_000)
  ap.add_argument("--queries", type=int, default=10_000)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--k", type=int, default=200)
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  train = rng.normal(size=(a.train, a.dim)).astype(np.float32)
  labels = rng.integers(0, a.classes, a.train)
  queries = rng.normal(size=(a.queries, a.dim)).astype(np.float32)
  rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t = time.perf_counter()
  scores = knn_scores(train, labels, queries, a.classes, k=a.k)
  seconds = time.perf_counter() - t
  print(json.dumps({
      "train": a.train, "queries": a.queries, "dim": a.dim, "classes": a.classes, "k": a.k,
      "batch_size": knn_batch_size(a.train), "seconds": round(seconds, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "rss_after_inputs_mb": round(rss_inputs),
      "inputs_mb": round((train.nbytes + queries.nbytes) / 2 ** 20),
      "scores_shape": list(scores.shape)}))


if __name__ == "__main__":
  main()
