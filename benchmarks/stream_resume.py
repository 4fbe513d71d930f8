"""Time to the first batch of a streamed tfds split resumed deep into its 3rd epoch, at two steps
an epoch apart, for the TFRecord and ArrayRecord forms of the synthetic ImageNet-shaped dataset;
and whether that batch is the one an uninterrupted stream serves (checked at the earlier step).
Image size, augmentation and seed are flags/imagenet_resnet50.cfg's (--preset), each changed by its
nnclr_tf flag.

  python benchmarks/stream_resume.py --train=512 --batch_size=32
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_imagenet  # noqa: E402

import common  # noqa: E402,F401  (sets the TF environment before TensorFlow is imported)
import run_settings  # noqa: E402

# The ImageNet recipe: the streamed, too-large-to-cache input path this resume belongs to.
PRESET = "imagenet_resnet50"
OVERRIDES = {
    "dataset": synthetic_imagenet.NAME, "eval_split": "test",  # the synthetic set's splits
    # A few hundred images instead of ImageNet's 1.28M: a batch of 32 (not the recipe's 4,096)
    # keeps an epoch several steps long, so the resume lands inside one.
    "batch_size": 32,
    # Streamed from the records, as a set too large for memory is: the resume is what is timed.
    "cache_limit_mb": 0,
}


def parser():
  ap = run_settings.Parser(PRESET, run_settings.flag_names(
      ("augment",), ("image_size", "batch_size", "seed")), overrides=OVERRIDES,
      description=__doc__.splitlines()[0])
  ap.add_argument("--train", type=int, default=512, help="training images of the synthetic set")
  ap.add_argument("--root", default="/tmp/nnclr_bench_stream")
  return ap


def main(argv=None):
  ap = parser()
  a, exp = ap.parse(argv)
  import numpy as np

  from nnclr_tf import data, experiment
  size, batch, seed = exp.data.image_size, exp.train.batch_size, exp.train.seed
  spe = a.train // batch
  steps = [2 * spe + spe // 2, 3 * spe + spe // 2]  # mid 3rd epoch, one epoch later
  out = {}
  for fmt in ("tfrecord", "array_record"):
    root = os.path.join(a.root, fmt)
    synthetic_imagenet.build(root, a.train, 20, fmt, num_shards=8)
    src, _ = experiment.load_data(exp.replace(data_dir=root))
    row = {"first_batch_s_by_step": {}}
    for step in steps:
      t = time.perf_counter()
      b = next(iter(data.pretrain_dataset(src, exp.augment, size, batch, seed,
                                          start_step=step)))
      row["first_batch_s_by_step"][str(step)] = round(time.perf_counter() - t, 3)
      if step == steps[0]:
        first = b
    t = time.perf_counter()
    full = list(data.pretrain_dataset(src, exp.augment, size, batch, seed).take(steps[0] + 1))
    row["replay_s"] = round(time.perf_counter() - t, 3)
    row["batch_equals_uninterrupted"] = all(
        np.array_equal(first[k].numpy(), full[-1][k].numpy()) for k in first)
    out[fmt] = row
  print(json.dumps({"benchmark": "stream_resume", "train": a.train, "batch_size": batch,
                    "steps_per_epoch": spe, "steps": steps, "results": out,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
