"""kNN and linear probe of a pretrained model_dir on a class-balanced subset of its train split.

A full kNN over CIFAR-10's 45,000 training images costs 45,000 forward passes per encoder (about
10 minutes per encoder on a 2-core CPU at ~80 GFLOP/s); under a fixed CPU budget we query the
held-out split against a class-balanced bank of --bank images instead, for the trained encoder, the
same architecture at random initialisation, and raw pixels. Prints one JSON line.

  python benchmarks/budget_eval.py --model_dir=runs/cifar20 --bank=10000 \
      --image_dir=../shared/data/cifar10/train --val_images=5000
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf import data, evaluation, experiment, linear_probe  # noqa: E402
from nnclr_tf.backbones import build_backbone  # noqa: E402
from nnclr_tf.config import Experiment  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", required=True)
  ap.add_argument("--image_dir", required=True)
  ap.add_argument("--val_images", type=int, default=5000)
  ap.add_argument("--bank", type=int, default=10000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--knn_k", type=int, default=200)
  ap.add_argument("--knn_temperature", type=float, default=0.1)
  args = ap.parse_args()

  # The run's own flags (flags.txt) with the evaluation data of this script.
  exp = Experiment.from_flagfile(
      os.path.join(args.model_dir, "flags.txt"), model_dir=args.model_dir, dataset="folder",
      image_dir=args.image_dir, val_images=args.val_images, seed=args.seed)
  model, latest = experiment.restored_model(exp)
  size = exp.data.image_size
  train, held = experiment.load_data(exp)
  _, bank = data.split_balanced(train, args.bank, args.seed)
  num_classes = len(train.class_names)
  out = {"checkpoint": latest, "bank_images": len(bank), "eval_images": len(held)}

  def score(name, encoder):
    t = time.perf_counter()
    bf, bl = evaluation.extract_features(encoder, data.eval_dataset(bank, size, 500))
    ef, el = evaluation.extract_features(encoder, data.eval_dataset(held, size, 500))
    s = evaluation.knn_scores(bf, bl, ef, num_classes, args.knn_k, args.knn_temperature)
    probe, info = linear_probe.fit_probe(bf, bl, num_classes, seed=args.seed)
    lin = linear_probe.evaluate_probe(probe, ef, el)
    out.update({f"{name}_knn_top1": evaluation.topk_accuracy(s, el, 1),
                f"{name}_knn_top5": evaluation.topk_accuracy(s, el, 5),
                f"{name}_linear_top1": lin["top1"], f"{name}_linear_top5": lin["top5"],
                f"{name}_seconds": time.perf_counter() - t})

  score("trained", model.encoder)
  keras.utils.set_random_seed(args.seed + 1)
  score("random_init", build_backbone(exp.model.backbone, (size, size, 3), False,
                                      exp.model.width, exp.model.zero_init_residual))
  raw = lambda x, training=False: tf.reshape(x, [tf.shape(x)[0], -1])  # noqa: E731
  score("raw_pixels", raw)
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  main()
