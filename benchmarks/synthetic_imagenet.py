"""A synthetic ImageNet-shaped tfds dataset, built locally (nothing is downloaded).

JPEGs of 200-500 px per side (ImageNet's typical range), 10 classes, a `train` and a `test` split,
prepared as TFRecord or ArrayRecord (`file_format=`), in several shards, so the tfds read paths
of a large dataset (streaming, SkipDecoding, data sources, shard order) run on real files. Each
image is a smooth random field tinted by its class plus noise: JPEG-compressible like a photo, and
learnable enough for a sanity check.

  python benchmarks/synthetic_imagenet.py --data_dir=/tmp/synth --train=2048 --format=tfrecord
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NAME = "synthetic_imagenet"
CLASSES = [f"class_{i}" for i in range(10)]


def make_image(rng, label, min_side=200, max_side=500):
  """uint8 [H, W, 3], H and W in [min_side, max_side]."""
  h, w = rng.integers(min_side, max_side + 1, size=2)
  coarse = rng.uniform(0, 255, size=(1, 6, 6, 3)).astype(np.float32)
  field = tf.image.resize(coarse, [h, w], method="bicubic")[0].numpy()
  tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32)
  image = 0.6 * field + 0.4 * tint + rng.normal(0, 12, size=(h, w, 3))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
  """ImageNet-shaped JPEGs; split sizes come from the builder config's `train` / `test` counts."""
  VERSION = tfds.core.Version("1.0.0")
  SIZES = {"train": 64, "test": 20}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=CLASSES)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in self.SIZES.items()}

  def _generate_examples(self, split, n):
    rng = np.random.default_rng(0 if split == "train" else 1)
    for i in range(n):
      label = i % len(CLASSES)
      # Encoded here (not by tfds) so the quality is ImageNet's usual ~90, not a library default.
      jpeg = tf.io.encode_jpeg(make_image(rng, label), quality=90).numpy()
      yield i, {"image": jpeg, "label": label}


def build(data_dir, train=64, test=20, file_format="tfrecord", num_shards=4):
  """Prepares the dataset under `data_dir` (reused when already there) and returns its builder.
  `num_shards` shards per split, so shard-order code has more than one file to order."""
  SyntheticImagenet.SIZES = {"train": train, "test": test}
  builder = SyntheticImagenet(data_dir=data_dir, file_format=file_format)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        num_shards=num_shards))
  info = builder.info.splits
  if (info["train"].num_examples, info["test"].num_examples) != (train, test):
    raise ValueError(f"{data_dir} holds another size of {NAME}; use a fresh --data_dir")
  return builder


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--train", type=int, default=2048)
  ap.add_argument("--test", type=int, default=200)
  ap.add_argument("--format", default="tfrecord", choices=["tfrecord", "array_record"])
  ap.add_argument("--shards", type=int, default=16)
  a = ap.parse_args()
  b = build(os.path.abspath(a.data_dir), a.train, a.test, a.format, a.shards)
  print(b.data_dir, b.info.splits["train"].num_shards, "train shards")


if __name__ == "__main__":
  main()
