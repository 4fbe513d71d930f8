"""The machine's dense matmul ceiling through TensorFlow: float32 and bfloat16 GFLOP/s.

A train step cannot beat the rate at which the same cores multiply dense matrices, so
`throughput.py` reports its achieved GFLOP/s as a fraction of this figure.

  python benchmarks/peak.py                   # sizes 1024,2048; one JSON line
  python benchmarks/peak.py --sizes=512 --seconds=0.2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def matmul_gflops(n, dtype="float32", seconds=1.0, repeats=3):
  """Best-of-`repeats` GFLOP/s of an [n, n] x [n, n] matmul in `dtype`, each repeat running
  about `seconds`. Best, not median: the ceiling is what the cores can do when not disturbed.
  Returns (per wall second, per CPU second of this process): on a shared machine the second
  is the steadier one, since other processes take wall time but not this process's CPU time."""
  import tensorflow as tf
  dt = tf.as_dtype(dtype)
  a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dt)
  b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dt)

  @tf.function
  def chain(a, b, k):
    # k matmuls inside one graph call, so the figure excludes Python dispatch.
    acc = tf.zeros([], tf.float32)
    for _ in tf.range(k):
      acc += tf.cast(tf.matmul(a, b)[0, 0], tf.float32)
    return acc

  flop = 2.0 * n ** 3
  chain(a, b, tf.constant(1)).numpy()  # trace + warm the kernels
  t = time.perf_counter()
  chain(a, b, tf.constant(1)).numpy()
  one = max(time.perf_counter() - t, 1e-6)
  k = max(1, int(seconds / one))
  best = best_cpu = 0.0
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    chain(a, b, tf.constant(k)).numpy()
    best = max(best, k * flop / (time.perf_counter() - t) / 1e9)
    best_cpu = max(best_cpu, k * flop / max(time.process_time() - c, 1e-9) / 1e9)
  return best, best_cpu


def measure(sizes=(1024, 2048), dtypes=("float32", "bfloat16"), seconds=1.0, repeats=3):
  """{dtype: {"gflops": best over sizes, "gflops_per_cpu_s": best per CPU second,
  "by_size": {n: gflops}}}."""
  out = {}
  for dtype in dtypes:
    runs = {str(n): matmul_gflops(n, dtype, seconds, repeats) for n in sizes}
    # Four significant digits, not two decimals: a tiny smoke matmul on a starved CPU must not
    # round down to 0 GFLOP/s.
    by_size = {n: float(f"{w:.4g}") for n, (w, _) in runs.items()}
    out[dtype] = {"gflops": max(by_size.values()),
                  "gflops_per_cpu_s": float(f"{max(c for _, c in runs.values()):.4g}"),
                  "by_size": by_size}
  return out


def machine():
  """CPU model, cores this process may use, and the SIMD flags that decide matmul speed."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and not model:
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
  return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "simd": simd}


def load_average():
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="1024,2048", help="comma-separated square matrix sides")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--seconds", type=float, default=1.0, help="length of each timed repeat")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  import tensorflow as tf
  sizes = tuple(int(s) for s in args.sizes.split(","))
  dtypes = tuple(args.dtypes.split(","))
  load_before = load_average()
  peak = measure(sizes, dtypes, args.seconds, args.repeats)
  print(json.dumps({"benchmark": "peak", "matmul": peak, "machine": machine(),
                    "tf_version": tf.__version__, "load_average_before": load_before,
                    "load_average_after": load_average(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
