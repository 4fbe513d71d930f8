"""kNN and linear probe of a pretrained model_dir on a class-balanced subset of its train split.

A full kNN over CIFAR-10's 45,000 training images costs 45,000 forward passes per encoder (about
10 minutes per encoder on a 2-core CPU at ~80 GFLOP/s); under a fixed CPU budget we query the
held-out split against a class-balanced bank of --bank images instead, for the trained encoder, the
same architecture at random initialisation, and raw pixels. Prints one JSON line.

  python benchmarks/budget_eval.py --model_dir=runs/cifar20 --bank=10000 \
      --image_dir=../shared/data/cifar10/train --val_images=5000
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

import run_settings  # noqa: E402
from nnclr_tf import data, evaluation, experiment, linear_probe  # noqa: E402

# The evaluation reads the images as a folder (--image_dir), whatever the run trained on; and
# extracts features 500 at a time, as RESULTS.md's timings were taken (features do not depend on
# the batch).
OVERRIDES = {"dataset": "folder", "eval_batch_size": 500}


def parser():
  # The run's own flags (its flags.txt) are the preset: same model, and by default its seed and
  # its kNN and probe settings.
  ap = run_settings.Parser(
      lambda args, given: os.path.join(given["model_dir"], "flags.txt"),
      ("model_dir", "image_dir", "val_images", "seed", "knn_k", "knn_temperature",
       "eval_batch_size", "linear_l2"),
      overrides=OVERRIDES, required=("model_dir", "image_dir"),
      description=__doc__.splitlines()[0])
  ap.add_argument("--bank", type=int, default=10000,
                  help="class-balanced training images the held-out ones are queried against")
  return ap


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  seed, size, batch = exp.train.seed, exp.data.image_size, exp.eval.batch_size
  k, temperature = exp.eval.knn_k, exp.eval.knn_temperature
  model, latest = experiment.restored_model(exp)
  train, held = experiment.load_data(exp)
  if held is None:
    ap.error("no held-out images to query: give --val_images (the run's flags.txt has none)")
  _, bank = data.split_balanced(train, args.bank, seed)
  num_classes = len(train.class_names)
  out = {"checkpoint": latest, "bank_images": len(bank), "eval_images": len(held)}

  def score(name, encoder):
    t = time.perf_counter()
    bf, bl = evaluation.extract_features(encoder, data.eval_dataset(bank, size, batch))
    ef, el = evaluation.extract_features(encoder, data.eval_dataset(held, size, batch))
    s = evaluation.knn_scores(bf, bl, ef, num_classes, k, temperature)
    probe, info = linear_probe.fit_probe(bf, bl, num_classes, l2=exp.probe.linear_l2, seed=seed)
    lin = linear_probe.evaluate_probe(probe, ef, el)
    out.update({f"{name}_knn_top1": evaluation.topk_accuracy(s, el, 1),
                f"{name}_knn_top5": evaluation.topk_accuracy(s, el, 5),
                f"{name}_linear_top1": lin["top1"], f"{name}_linear_top5": lin["top5"],
                f"{name}_seconds": time.perf_counter() - t})

  score("trained", model.encoder)
  score("random_init", experiment.build_encoder(exp))  # the run's seed + 1, as knn_eval's
  raw = lambda x, training=False: tf.reshape(x, [tf.shape(x)[0], -1])  # noqa: E731
  score("raw_pixels", raw)
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  main()
