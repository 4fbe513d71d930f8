"""Peak memory of the SGD linear protocol (--linear_protocol=sgd) against the training set's size.

  python benchmarks/linear_memory.py --images=2000
  python benchmarks/linear_memory.py --images=8000

Writes `--images` PNG files (class sub-folders, 10 classes) into a temporary folder, read lazily
as --dataset=folder reads files that do not fit --cache_limit_mb, and fits the linear head of a
tiny random-init encoder on them for `--epochs` (linear_sgd.fit, scored on 200 held-out images
in memory). Prints one JSON line: the process's peak RSS during the fit (VmHWM, reset just before
it where the kernel allows), which must not grow with `--images`: the protocol holds a few
batches, never the features or the images (tests/test_linear_sgd.py compares 2,000 and 8,000).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from knn_memory import reset_peak, status_mb  # noqa: E402

from nnclr_tf import data, linear_sgd  # noqa: E402
from nnclr_tf.config import AugmentConfig  # noqa: E402
from nnclr_tf.model import NNCLR  # noqa: E402

CLASSES = 10


def image(rng, label, side):
  """uint8 [side, side, 3]: noise tinted by the class, so the head has something to learn."""
  tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32)
  return np.clip(0.5 * tint + rng.normal(96, 40, (side, side, 3)), 0, 255).astype(np.uint8)


def write_images(folder, n, side, seed=0):
  """n PNGs under folder/<class>/, one at a time (nothing of the set is held in memory)."""
  rng = np.random.default_rng(seed)
  for c in range(CLASSES):
    os.makedirs(os.path.join(folder, f"class_{c}"), exist_ok=True)
  for i in range(n):
    path = os.path.join(folder, f"class_{i % CLASSES}", f"{i:06d}.png")
    tf.io.write_file(path, tf.io.encode_png(image(rng, i % CLASSES, side)))


def parser():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=2000)
  ap.add_argument("--side", type=int, default=40, help="side of the PNG files")
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--dir", default="", help="where to write the images (default: a temporary "
                  "folder, removed after)")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  folder = a.dir or tempfile.mkdtemp(prefix="linear_memory-")
  try:
    write_images(folder, a.images, a.side)
    train = data.folder_source(folder)
    rng = np.random.default_rng(1)
    held_labels = np.arange(200) % CLASSES
    held = data.numpy_source(np.stack([image(rng, c, a.side) for c in held_labels]), held_labels)
    keras.utils.set_random_seed(0)
    encoder = NNCLR(backbone="small_cnn", image_size=a.image_size, width=8, proj_hidden_dim=32,
                    proj_layers=2, pred_hidden_dim=32, embedding_dim=16, queue_size=64).encoder
    before = status_mb("VmRSS")
    reset = reset_peak()
    t = time.perf_counter()
    _, info = linear_sgd.fit(encoder, train, held, CLASSES, a.image_size,
                             AugmentConfig(flip_prob=0.5), os.path.join(folder, "run"),
                             learning_rate=1.0, epochs=a.epochs, batch_size=a.batch_size)
    seconds = time.perf_counter() - t
    peak = status_mb("VmHWM")
  finally:
    if not a.dir:
      shutil.rmtree(folder, ignore_errors=True)
  print(json.dumps({
      "images": a.images, "epochs": a.epochs, "steps": info["steps"],
      "batch_size": a.batch_size, "image_size": a.image_size, "seconds": round(seconds, 2),
      "rss_before_fit_mb": round(before), "peak_rss_mb": round(peak),
      "peak_is_of_the_fit": reset, "linear_top1": info["linear_top1"]}))


if __name__ == "__main__":
  main()
