"""--linear_protocol=sgd: the linear evaluation protocol of SimCLR, BYOL and NNCLR, at any dataset
size.

A linear layer on the frozen encoder (inference mode: BatchNorm reads its moving statistics and no
gradient reaches the encoder) is trained with model.fit on a stream of random resized crop + flip
views of the training images (`pipelines.linear_dataset`: the pretraining stream's order and
crop, no colour, one view per example), with Nesterov momentum 0.9, lr `learning_rate` x B/256
cosine-decayed to 0 over the run, and no weight decay. SimCLR (Chen et al. 2020, appendix B.6)
follows its fine-tuning procedure (B.5: Nesterov momentum 0.9, batch 4096, crop + flip only, no
regularisation) "except that a larger learning rate of 1.6 (following LearningRate = 0.1 x
BatchSize/256) and longer training of 90 epochs"; the cosine decay is this project's, as in
finetune.py. Nothing is held in memory but a few batches, so the peak does not grow with the
training set (benchmarks/linear_memory.py measures it).

It runs under the pretraining strategy and is checkpointed and resumed as pretraining is: the
stream is a pure function of (seed, step), the head and its optimizer are saved every
--checkpoint_every_steps and at each epoch end into a folder named after the encoder's checkpoint
and these settings, and a rerun of the same command after a kill resumes there.

The result is the same probe.npz as the L-BFGS protocol writes, with feature_mean 0 and
feature_std 1 (nothing is standardised: the Dense layer reads raw features), so the classifier
export reads both protocols' probes alike and computes the Dense layer's logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import augment, checkpoints, distributed, training
from nnclr_tf.checks import check_examples, check_replicas
from nnclr_tf.config import AugmentConfig
from nnclr_tf.evaluation import extract_features, topk_accuracy
from nnclr_tf.linear_probe import Probe
from nnclr_tf.pipelines import distributed_linear_dataset, eval_dataset, steps_per_epoch
from nnclr_tf.schedules import scaled_learning_rate

HEAD = "linear_head"
FOLDER = os.path.join("linear_probe", "sgd")  # under model_dir: one run folder per fit


def classifier(encoder, num_classes):
  """encoder (frozen, inference mode) -> Dense(num_classes), zero-initialised so that the first
  logits are uniform."""
  # trainable=False keeps the encoder's variables out of the optimizer (and, in Keras 3, puts its
  # BatchNorm in inference mode); training=False says the same in the graph.
  encoder.trainable = False
  inputs = keras.Input(encoder.input.shape[1:])
  logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", dtype="float32",
                              name=HEAD)(encoder(inputs, training=False))
  return keras.Model(inputs, logits, name="linear_classifier")


def compiled_classifier(encoder, num_classes, peak_lr, total_steps, momentum=0.9, strategy=None):
  """`classifier`, compiled with Nesterov SGD on a cosine decay from `peak_lr` to 0 at
  `total_steps`, no weight decay, and its optimizer built (a restore then fills its slots)."""
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    model = classifier(encoder, num_classes)
    model.compile(optimizer=keras.optimizers.SGD(
                      keras.optimizers.schedules.CosineDecay(peak_lr, total_steps),
                      momentum=momentum, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
  return model


def head_checkpoint(model):
  """What a fit saves: the head and the optimizer (its step and momentum). The encoder is the
  pretraining checkpoint's, which names the run folder, so it is not copied into every save."""
  return tf.train.Checkpoint(model=model.get_layer(HEAD), optimizer=model.optimizer)


def run_dir(model_dir, checkpoint, settings):
  """model_dir/linear_probe/sgd/<ckpt-N>-<hash of the encoder checkpoint and `settings`>: a fit
  resumes only a fit of the same encoder, data, views and schedule."""
  key = json.dumps({"checkpoint": os.path.abspath(checkpoint), **settings}, sort_keys=True,
                   default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return os.path.join(model_dir, FOLDER, f"{os.path.basename(checkpoint)}-{digest}")


def settings_key(data_cfg, aug: AugmentConfig, learning_rate, epochs, batch_size, seed):
  """The settings `run_dir` is keyed by (JSON-able)."""
  return {"data": dataclasses.asdict(data_cfg),
          "views": dataclasses.asdict(augment.crop_flip(aug)), "learning_rate": learning_rate,
          "epochs": epochs, "batch_size": batch_size, "seed": seed}


def check_batch(batch_size, num_examples, replicas):
  """One ConfigError line naming --linear_batch_size when it cannot make an epoch or be split
  (the stream checks the same conditions, naming pretraining's flag)."""
  check_examples(batch_size, num_examples, "linear_batch_size")
  check_replicas(batch_size, replicas, "linear_batch_size")


def fit(encoder, train, held, num_classes, image_size, aug: AugmentConfig, out_dir, *,
        learning_rate=0.1, epochs=90, batch_size=256, momentum=0.9, seed=0, strategy=None,
        class_names=None, eval_batch_size=256, eval_crop_fraction=1.0, checkpoint_every_steps=0,
        keep_checkpoints=3, verbose=0, callbacks=()):
  """Trains the linear head of `encoder` on `train` (resuming from `out_dir`), scores it on
  `held` through the evaluation transform, and returns (Probe, info dict).

  `encoder` must have been built in `strategy.scope()`; it is set non-trainable. The global
  batch `batch_size` is split over the replicas; an epoch is len(train) // batch_size steps."""
  strategy = strategy or tf.distribute.get_strategy()
  n = len(train)
  check_batch(batch_size, n, strategy.num_replicas_in_sync)
  spe = steps_per_epoch(n, batch_size)
  total = epochs * spe
  lr = scaled_learning_rate(learning_rate, batch_size, "linear")
  model = compiled_classifier(encoder, num_classes, lr, total, momentum, strategy)
  out_dir = distributed.worker_dir(out_dir, strategy)
  restored = checkpoints.restore_latest(model, out_dir, make=head_checkpoint)
  start = int(model.optimizer.iterations.numpy())
  training.check_workers_agree(strategy, start)
  guard = training.NonFiniteGuard()  # before CheckpointCallback: see NonFiniteGuard
  stopper = training.StopOnSignal(strategy)
  timing = training.TimingCallback()
  cbs = [guard, stopper,
         checkpoints.CheckpointCallback(out_dir, checkpoint_every_steps, keep_checkpoints, guard,
                                        stopper, make=head_checkpoint),
         timing, *callbacks]

  def stream(at):
    return distributed_linear_dataset(strategy, train, aug, image_size, batch_size, seed, at)

  began = time.perf_counter()
  stopper.install()
  try:
    training.fit_to(model, stream, cbs, guard, stopper, out_dir, start, total, spe, verbose,
                    hint="Lower --linear_lr")
  finally:
    stopper.uninstall()
  seconds = time.perf_counter() - began
  head = model.get_layer(HEAD)
  kernel, bias = (np.asarray(v.numpy(), np.float32) for v in (head.kernel, head.bias))
  dim = kernel.shape[0]
  names = list(class_names or []) or [str(i) for i in range(num_classes)]
  probe = Probe(kernel=kernel, bias=bias, feature_mean=np.zeros(dim, np.float32),
                feature_std=np.ones(dim, np.float32), class_names=np.asarray(names, dtype=str),
                image_size=int(image_size))
  logits, labels = extract_features(
      model, eval_dataset(held, image_size, eval_batch_size, eval_crop_fraction),
      "linear head on the eval split", len(held))
  logs = timing.last_logs
  info = {"linear_top1": topk_accuracy(logits, labels, 1),
          "linear_top5": topk_accuracy(logits, labels, 5),
          "eval_examples": int(len(labels)), "feature_dim": int(dim),
          "train_examples": int(n), "epochs": int(epochs), "steps": int(total),
          "steps_per_epoch": int(spe), "batch_size": int(batch_size), "learning_rate": lr,
          "resumed_from_step": start if restored else 0, "fit_seconds": seconds,
          "sgd_dir": out_dir}
  if "loss" in logs:  # none when the run had finished already
    info["final_train_loss"] = float(logs["loss"])
    info["train_accuracy"] = float(logs["accuracy"])
  return probe, info
