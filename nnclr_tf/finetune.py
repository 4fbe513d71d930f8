"""Semi-supervised evaluation: fine-tune the whole network with a linear head on a small labelled
subset (NNCLR paper, Table 2 "semi-supervised", following SimCLR's protocol):

  "we fine-tune ... using Nesterov momentum with batch size 4096, momentum 0.9, learning rate 0.8
   (following LearningRate = 0.05 x BatchSize/256) without warmup. Only random cropping (with random
   left-to-right flipping ...) is used for preprocessing ... we do not use any regularization
   (including weight decay)." (SimCLR, Chen et al. 2020, appendix B.5; 60 epochs for 1% labels,
   30 for 10%.)

Here the crop scale and flip probability come from the pretraining AugmentConfig (so a dataset that
must not be flipped, like digits, is not) and the lr follows a cosine decay. On ImageNet the
labelled images are SimCLR's published 1% / 10% lists (tfds imagenet2012_subset, streamed from
its files, `subset=`); on any other dataset the subset is class-balanced and seeded
(`label_subset`, drawn as the validation split is). The training stream is
`pipelines.finetune_dataset` (`train_dataset` here), shuffled as pretraining is.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import sources
from nnclr_tf.config import AugmentConfig
from nnclr_tf.errors import DataError
from nnclr_tf.evaluation import extract_features, topk_accuracy
from nnclr_tf.pipelines import eval_dataset
from nnclr_tf.pipelines import finetune_dataset as train_dataset


def label_subset(labels, fraction, seed):
  """Sorted indices of a seeded, class-balanced subset of round(fraction x N) labelled examples:
  every class gets the same count (±1 where N x fraction is not a multiple of the class count) and
  at least one. The same (labels, fraction, seed) always gives the same subset."""
  labels = np.asarray(labels)
  if not 0 < fraction <= 1:
    raise DataError(f"--label_fraction={fraction} must be in (0, 1], e.g. 0.01 or 0.1")
  labelled = np.flatnonzero(labels >= 0)
  classes = np.unique(labels[labelled])
  if len(classes) < 2:
    raise DataError("fine-tuning needs labelled training data of at least 2 classes")
  n = max(len(classes), int(round(fraction * len(labelled))))
  return sources.balanced_indices(labels, n, seed, among=labelled, too_few=lambda c, want, have: (
      f"--label_fraction={fraction} asks for {want} images of class {c}, which has {have}; "
      "lower --label_fraction"))


def classifier(encoder, num_classes):
  """encoder -> Dense(num_classes), zero-initialised so the first logits are uniform."""
  inputs = keras.Input(encoder.input.shape[1:])
  logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", dtype="float32",
                              name="head")(encoder(inputs))
  return keras.Model(inputs, logits, name="finetune_classifier")


def simclr_epochs(label_fraction):
  """SimCLR's fine-tune epochs: 60 for 1% labels (or fewer), 30 otherwise (10%)."""
  return 60 if label_fraction <= 0.01 else 30


def nesterov_sgd(schedule, momentum, weight_decay, variables):
  """Nesterov SGD; a weight decay is decoupled and leaves biases and BN (rank-1) undecayed."""
  opt = keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True,
                             weight_decay=weight_decay or None)
  if weight_decay:
    opt.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
  return opt


def finetune(encoder, train_source, eval_source, num_classes, image_size, aug: AugmentConfig,
             label_fraction=0.1, epochs=0, batch_size=256, learning_rate=0.05, momentum=0.9,
             weight_decay=0.0, seed=0, strategy=None, eval_batch_size=256, verbose=0,
             min_steps=300, eval_crop_fraction=1.0, subset=None):
  """Fine-tunes `encoder` (in place) with a linear head on a class-balanced `label_fraction` of
  `train_source`, or on all of it when `subset` names the published subset it is (e.g.
  "imagenet2012_subset/10pct"); returns {"finetune_top1", "finetune_top5", "subset", ...} on
  `eval_source`, seen through `data.eval_dataset` at `eval_crop_fraction`.

  epochs=0 picks SimCLR's schedule, 60 epochs for <= 1% labels and 30 otherwise, but at least
  `min_steps` optimizer steps: SimCLR's epochs are hundreds of steps on ImageNet, while 10% of a
  small dataset is one batch, so 30 epochs would be 30 steps (digits 10%: 0.40 top-1 after 30 steps,
  0.90 after 300). A published subset is SimCLR's own data, so its epochs apply without the floor.
  The global batch is min(batch_size, subset size) rounded down to a multiple of the replica
  count; lr = learning_rate x batch / 256, cosine-decayed to 0, Nesterov momentum; an epoch is
  floor(subset size / batch) steps.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if subset:
    labelled, min_steps = train_source, 0
  elif train_source.streamed:
    raise DataError(f"--label_fraction={label_fraction:g}: {train_source.name} is streamed (over "
                    "--cache_limit_mb), so its labels are not in memory for the class-balanced "
                    "draw; raise --cache_limit_mb to hold it")
  else:
    labelled = train_source.subset(label_subset(train_source.labels, label_fraction, seed))
  replicas = strategy.num_replicas_in_sync
  batch = min(batch_size, len(labelled)) // replicas * replicas
  if batch < 1:
    raise DataError(f"--label_fraction={label_fraction} leaves {len(labelled)} examples, "
                    f"fewer than the {replicas} replicas")
  spe = max(1, len(labelled) // batch)
  epochs = epochs or max(simclr_epochs(label_fraction), -(-min_steps // spe))
  total = epochs * spe
  lr = learning_rate * batch / 256.0
  with strategy.scope():
    model = classifier(encoder, num_classes)
    schedule = keras.optimizers.schedules.CosineDecay(lr, total)
    opt = nesterov_sgd(schedule, momentum, weight_decay, model.trainable_variables)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
  history = model.fit(train_dataset(labelled, image_size, batch, seed, aug), epochs=epochs,
                      steps_per_epoch=spe, verbose=verbose)
  logits, labels = extract_features(model, eval_dataset(
      eval_source, image_size, eval_batch_size, eval_crop_fraction))
  results = {
      "finetune_top1": topk_accuracy(logits, labels, 1),
      "finetune_top5": topk_accuracy(logits, labels, 5),
      "label_fraction": label_fraction,
      "subset": subset or f"class-balanced draw of {train_source.name}, seed {seed}",
      "labelled_examples": int(len(labelled)),
  }
  if not labelled.streamed:  # a streamed subset's labels are not in memory to count
    counts = np.bincount(labelled.labels)
    counts = counts[counts > 0]
    results["labelled_per_class"] = [int(counts.min()), int(counts.max())]
  results.update({
      "epochs": epochs, "steps": total, "batch_size": batch, "learning_rate": lr,
      "final_train_loss": float(history.history["loss"][-1]),
      "eval_examples": int(len(labels)),
  })
  return results
