"""Time to the first batch of a streamed tfds split resumed deep into its 3rd epoch, at two steps
an epoch apart, for the TFRecord and ArrayRecord forms of the synthetic ImageNet-shaped dataset;
and whether that batch is the one an uninterrupted stream serves (checked at the earlier step).

  python benchmarks/stream_resume.py --train=512 --batch_size=32
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_imagenet  # noqa: E402

import common  # noqa: E402,F401  (sets the TF environment before TensorFlow is imported)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--train", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--root", default="/tmp/nnclr_bench_stream")
  a = ap.parse_args()
  import numpy as np

  from nnclr_tf import data
  from nnclr_tf.config import AugmentConfig, DataConfig
  spe = a.train // a.batch_size
  steps = [2 * spe + spe // 2, 3 * spe + spe // 2]  # mid 3rd epoch, one epoch later
  out = {}
  for fmt in ("tfrecord", "array_record"):
    root = os.path.join(a.root, fmt)
    synthetic_imagenet.build(root, a.train, 20, fmt, num_shards=8)
    src, _ = data.load_sources(DataConfig(dataset=synthetic_imagenet.NAME, data_dir=root,
                                          image_size=a.image_size, cache_limit_mb=0))
    row = {"first_batch_s_by_step": {}}
    for step in steps:
      t = time.perf_counter()
      b = next(iter(data.pretrain_dataset(src, AugmentConfig(), a.image_size, a.batch_size, 0,
                                          start_step=step)))
      row["first_batch_s_by_step"][str(step)] = round(time.perf_counter() - t, 3)
      if step == steps[0]:
        first = b
    t = time.perf_counter()
    full = list(data.pretrain_dataset(src, AugmentConfig(), a.image_size, a.batch_size, 0)
                .take(steps[0] + 1))
    row["replay_s"] = round(time.perf_counter() - t, 3)
    row["batch_equals_uninterrupted"] = all(
        np.array_equal(first[k].numpy(), full[-1][k].numpy()) for k in first)
    out[fmt] = row
  print(json.dumps({"benchmark": "stream_resume", "train": a.train, "batch_size": a.batch_size,
                    "steps_per_epoch": spe, "steps": steps, "results": out,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
