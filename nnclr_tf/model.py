"""NNCLR as a keras.Model with a custom train_step, usable with `model.fit`.

Per step (NNCLR paper, Algorithm 1), on each replica with its local batch of b pairs:
  z = normalize(projector(encoder(view)))       p = normalize(predictor(projector(...)))
  nn1 = NN(z1, Q), nn2 = NN(z2, Q)              looked up in the queue as it was before this step
  loss = 0.5 * (InfoNCE(nn1, p2) + InfoNCE(nn2, p1)), negatives from the global batch
    (symmetric_loss: each InfoNCE also averages in its column term, the softmax of a prediction
    over the global batch's neighbours, so the neighbours are all-gathered too)
  Q <- enqueue(all_gather(z1))                  after the loss

Gradient path: the neighbours are constants (tf.stop_gradient inside SupportSet.nearest_neighbour);
gradients reach the encoder only through the predictions p (and p's all_gather is differentiable,
so a replica's p also receives gradient from the other replicas' rows). Each replica's loss is
divided by the replica count because Keras sums gradients over replicas.

Online linear probe (optional, `online_probe_classes > 0`): a softmax classifier on the
stop-gradient backbone features of both views, trained in the same step with its own tape and its
own optimizer (Adam, constant lr; solo-learn likewise gives its online classifier a separate
parameter group). Its variables are kept out of `trainable_variables`, so the pretraining optimizer
(LARS with warm-up/cosine) never sees them and the encoder's gradients are exactly those of the
NNCLR loss. Rows with label -1 (unknown) are masked out.

Keras use: `test_step` scores held-out pairs with the training loss without writing the support
set, so `fit(validation_data=...)` and `evaluate` work; `data.pretraining_stream` makes the pairs
from a user's tf.data. `model(images)` takes uint8 or float images of any size through the
exported encoder's preprocessing (`preprocess`). `backbone` may be a name or any keras.Model
mapping [0, 1] images to feature vectors; `portable_encoder()` is the encoder in stock Keras
layers, for what users save and build on.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from nnclr_tf import augment, colour, distributed
from nnclr_tf import export as export_lib
from nnclr_tf.backbones import build_backbone, stock_layers, wrap_backbone
from nnclr_tf.heads import prediction_head, projection_head
from nnclr_tf.losses import nnclr_loss
from nnclr_tf.model_config import NNCLRConfig, split_kwargs
from nnclr_tf.support_set import SupportSet


@keras.saving.register_keras_serializable(package="nnclr_tf")
class NNCLR(keras.Model):

  def __init__(self, config: NNCLRConfig | None = None, **kwargs):
    """NNCLR(NNCLRConfig(...)) or NNCLR(backbone=..., image_size=..., ...) with NNCLRConfig's
    fields as keywords (Keras's name, trainable and dtype go to keras.Model)."""
    if config is not None and not isinstance(config, NNCLRConfig):
      kwargs["backbone"] = config  # NNCLR("resnet18_cifar", ...): the backbone, positionally
      config = None
    fields, keras_kwargs = split_kwargs(kwargs)
    super().__init__(**keras_kwargs)
    if isinstance(fields.get("backbone"), dict):  # a user backbone, as get_config recorded it
      fields["backbone"] = keras.saving.deserialize_keras_object(fields["backbone"])
    self.config = cfg = config if config is not None else NNCLRConfig(**fields)
    size = (cfg.image_size, cfg.image_size, 3)
    if isinstance(cfg.backbone, keras.Model):
      self.encoder = wrap_backbone(cfg.backbone, size)
    else:
      self.encoder = build_backbone(cfg.backbone, size, cfg.global_bn, cfg.width,
                                    cfg.zero_init_residual)
    feat_dim = self.encoder.output.shape[-1]
    self.projector = projection_head(feat_dim, cfg.proj_hidden_dim, cfg.embedding_dim,
                                     cfg.proj_layers, cfg.global_bn)
    self.predictor = prediction_head(cfg.embedding_dim, cfg.pred_hidden_dim, cfg.global_bn)
    self.support_set = SupportSet(cfg.queue_size, cfg.embedding_dim, seed=cfg.seed,
                                  name="support_set")
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.hit_tracker = keras.metrics.Mean(name="nn_label_hit")
    self.acc_tracker = keras.metrics.Mean(name="contrastive_acc")
    self.sim_tracker = keras.metrics.Mean(name="nn_similarity")
    self.online_probe: Any = None  # a keras.layers.Dense when the probe is on
    if cfg.online_probe_classes:
      self._build_online_probe(feat_dim, cfg.online_probe_classes, cfg.online_probe_lr)
    self.built = True  # every sub-model is built at construction; fit must not trace call()

  def _build_online_probe(self, feat_dim, num_classes, lr):
    # trainable=False keeps the probe out of trainable_variables (and so out of the pretraining
    # optimizer and its checkpointed slots); _probe_step updates it with its own optimizer. Built
    # here, in the strategy scope, so a checkpoint restore finds its variables and Adam slots.
    self.online_probe = keras.layers.Dense(num_classes, dtype="float32", trainable=False,
                                           name="online_probe")
    self.online_probe.build((None, feat_dim))
    self.probe_optimizer = keras.optimizers.Adam(lr, name="online_probe_adam")
    self.probe_optimizer.build(self.online_probe.weights)
    self.probe_loss_tracker = keras.metrics.Mean(name="online_probe_loss")
    self.probe_acc_tracker = keras.metrics.Mean(name="online_probe_acc")

  def get_config(self):
    config = {**super().get_config(), **self.config.to_dict()}
    if isinstance(config["backbone"], keras.Model):
      config["backbone"] = keras.saving.serialize_keras_object(config["backbone"])
    return config

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Builds what model.fit's symbolic build would, without its cross-replica reduce.

    Keras 3.15 (backend/tensorflow/trainer.py, `_maybe_symbolic_build`) pulls one distributed
    batch and averages it with `strategy.reduce("MEAN", batch)` only to learn input shapes.
    MultiWorkerMirroredStrategy cannot reduce a nested batch: its
    `CollectiveAllReduceExtended._reduce_to`, unlike MirroredStrategy's, does not map over the
    dict and fails with "Attempt to convert a value ({'view1': PerReplica...}) to a Tensor";
    it would also all-reduce a batch of images across hosts for nothing. NNCLR builds every layer
    in __init__ and has no compiled loss or metrics, so the optimizer is the only state left.
    """
    if self._compile_loss is not None or self._compile_metrics is not None:
      return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
    if self.optimizer is not None and not self.optimizer.built:
      with self.distribute_strategy.scope():
        self.optimizer.build(self.trainable_variables)

  @property
  def metrics(self):
    probe: list = ([] if self.online_probe is None else
                   [self.probe_loss_tracker, self.probe_acc_tracker])
    return [self.loss_tracker, self.hit_tracker, self.acc_tracker, self.sim_tracker, *probe]

  def preprocess(self, images):
    """uint8 or float [0, 1] images [N, H, W, 3] (or one [H, W, 3]) of any size -> the float
    [N, S, S, 3] the encoder takes: `augment.eval_transform` at this model's image size and
    evaluation crop fraction, the preprocessing of the exported encoder and of evaluation."""
    return augment.eval_transform(images, self.config.image_size, self.config.eval_crop_fraction)

  def call(self, images, training=False):
    """Backbone features [N, D] of uint8 or float [0, 1] images of any size (see `preprocess`)."""
    return self.encoder(self.preprocess(images), training=training)

  def encode(self, images):
    """Inference features of raw images: `model(images)` in inference mode."""
    return self(images, training=False)

  def portable_encoder(self):
    """The encoder as a keras.Model of stock Keras layers, with this model's current weights:
    float [0, 1] images [N, S, S, 3] (`preprocess` makes them) -> features [N, D].

    Its outputs are the encoder's; `.keras` files of it, or of any model built on it, load where
    nnclr_tf is not installed (the encoder itself may hold nnclr_tf's fused BatchNormalization).
    The weights are copied: later training of this model does not change it.
    """
    return stock_layers(self.encoder)

  def export(self, filepath, format="tf_saved_model", verbose=True, input_signature=None,
             **kwargs):
    """Writes the served encoder SavedModel to `filepath`: uint8 images of any size or encoded
    image bytes -> features and projection, as `export.export_encoder` (without its versioned
    layout). Other formats: export `model.portable_encoder()` with Keras's own `export`."""
    if format != "tf_saved_model" or input_signature is not None or kwargs:
      raise ValueError(
          "NNCLR.export writes only the served encoder SavedModel (format='tf_saved_model', no "
          "input_signature); for another format or signature use "
          "model.portable_encoder().export(filepath, format=..., input_signature=...)")
    path = export_lib.save_encoder(self, filepath, crop_fraction=self.config.eval_crop_fraction)
    if verbose:
      print(f"Saved the NNCLR encoder SavedModel to {path}")
    return path

  def embed(self, images, training=False):
    """(features, z, p): backbone features, L2-normalised projection and prediction."""
    h = self.encoder(images, training=training)
    z = self.projector(h, training=training)
    p = self.predictor(z, training=training)
    return h, tf.math.l2_normalize(z, axis=-1), tf.math.l2_normalize(p, axis=-1)

  def _topk_choice(self, step, local_batch, global_batch, view):
    """Uniform draws in [0, k) over the global batch, sliced to this replica's rows, so the
    draw for a given example does not depend on how many replicas there are."""
    if self.config.nn_topk == 1:
      return None
    seed = tf.stack([tf.cast(self.config.seed * 2 + view, tf.int64), tf.cast(step, tf.int64)])
    draws = tf.random.stateless_uniform([global_batch], seed, 0, self.config.nn_topk,
                                        dtype=tf.int32)
    return distributed.local_rows(draws, local_batch)

  def _positives(self, z, choice):
    if not self.config.use_nn:
      return z, None  # SimCLR ablation: the positive is the other view's own embedding
    return self.support_set.nearest_neighbour(z, self.config.nn_topk, choice)

  def _loss(self, nn, p, offset):
    if not self.config.symmetric_loss:
      return nnclr_loss(nn, distributed.all_gather(p), self.config.temperature, offset)
    return nnclr_loss(nn, distributed.all_gather(p), self.config.temperature, offset,
                      symmetric=True, nn_global=distributed.all_gather(nn), p_local=p)

  def _pair_loss(self, data, step, training):
    """The NNCLR loss of a batch of pairs against the support set as it is (nothing is written):
    (loss, h, z1, nn1, idx1, row-term logits, targets). A batch of uint8 crops with their colour
    parameters (augment_on="device") is coloured here, on this replica's rows."""
    view1, view2 = data["view1"], data["view2"]
    if "colour1" in data:
      view1, view2 = colour.apply(view1, data["colour1"]), colour.apply(view2, data["colour2"])
    b = view1.shape[0]
    global_batch = b * distributed.num_replicas()
    offset = distributed.replica_id() * b
    h, z, p = self.embed(tf.concat([view1, view2], axis=0), training=training)
    z1, z2 = z[:b], z[b:]
    p1, p2 = p[:b], p[b:]
    nn1, idx1 = self._positives(z1, self._topk_choice(step, b, global_batch, 0))
    nn2, _ = self._positives(z2, self._topk_choice(step, b, global_batch, 1))
    loss1, logits1, targets = self._loss(nn1, p2, offset)
    loss2, _, _ = self._loss(nn2, p1, offset)
    return 0.5 * (loss1 + loss2), h, z1, nn1, idx1, logits1, targets

  def _update_metrics(self, loss, labels, z1, nn1, idx1, logits1, targets):
    if self.config.use_nn:
      nn_labels = self.support_set.neighbour_labels(idx1)
      valid = tf.cast(tf.logical_and(labels >= 0, nn_labels >= 0), tf.float32)
      self.hit_tracker.update_state(tf.cast(tf.equal(nn_labels, labels), tf.float32), valid)
    self.loss_tracker.update_state(loss)
    self.acc_tracker.update_state(
        tf.cast(tf.equal(tf.argmax(logits1, axis=1, output_type=tf.int32), targets), tf.float32))
    self.sim_tracker.update_state(tf.reduce_sum(tf.cast(nn1, tf.float32) * z1, axis=1))
    logs = {m.name: m.result() for m in self.metrics}
    if distributed.in_multi_worker_mode():
      # Keras 3.15 reduces fit's per-replica logs with strategy.reduce("MEAN", v, axis=0) under
      # multi-worker MirroredStrategy (backend/tensorflow/trainer.py, reduce_per_replica), which
      # fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions",
      # tensorflow#72388). With a batch axis of 1 that reduce returns the scalar replica mean.
      logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs

  def train_step(self, data):
    labels = data["label"]
    replicas = distributed.num_replicas()
    with tf.GradientTape() as tape:
      loss, h, z1, nn1, idx1, logits1, targets = self._pair_loss(
          data, self.optimizer.iterations, training=True)
      scaled = self.optimizer.scale_loss(loss / replicas)

    variables = self.trainable_variables
    grads = tape.gradient(scaled, variables)
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      # fp16: the optimizer unscales the gradients and skips steps that overflowed; make that
      # skip decision the same on every replica and worker.
      grads = distributed.poison_unless_all_finite(grads)
    self.optimizer.apply_gradients(zip(grads, variables))
    if self.online_probe is not None:
      self._probe_step(h, tf.concat([labels, labels], axis=0))

    logs = self._update_metrics(loss, labels, z1, nn1, idx1, logits1, targets)
    if self.config.use_nn:
      # Enqueue after the lookup and the loss: this step's queries saw the old queue.
      self.support_set.update(distributed.all_gather(tf.stop_gradient(z1)),
                              distributed.all_gather(labels))
    return logs

  def test_step(self, data):
    """Loss, contrastive accuracy, neighbour metrics (and the online probe's loss and accuracy on
    labelled rows) of held-out pairs, in inference mode. The support set is read as training left
    it and never written, so evaluation does not change what training does next. A top-k > 1
    draw uses the fixed step 0, so repeated evaluations score the same neighbours."""
    labels = data["label"]
    loss, h, z1, nn1, idx1, logits1, targets = self._pair_loss(data, 0, training=False)
    if self.online_probe is not None:
      both = tf.concat([labels, labels], axis=0)
      logits = self.online_probe(tf.cast(h, tf.float32))
      mask = tf.cast(both >= 0, tf.float32)
      ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(both, 0), logits)
      hit = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), both)
      self.probe_loss_tracker.update_state(ce, mask)
      self.probe_acc_tracker.update_state(tf.cast(hit, tf.float32), mask)
    return self._update_metrics(loss, labels, z1, nn1, idx1, logits1, targets)

  def _probe_step(self, features, labels):
    """One update of the online probe on stop-gradient features; rows with label -1 are masked.

    The loss is this replica's summed cross-entropy divided by the number of labelled rows in the
    GLOBAL batch: Keras sums gradients over replicas, so the update is that of the global mean
    (on one replica, and whatever the replica count; with equal counts per replica this is the
    local mean divided by the replica count, as in train_step).
    """
    features = tf.stop_gradient(tf.cast(features, tf.float32))
    mask = tf.cast(labels >= 0, tf.float32)
    count = tf.maximum(tf.reduce_sum(distributed.all_gather(mask)), 1.0)
    variables = self.online_probe.weights
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch([v.value for v in variables])
      logits = self.online_probe(features)
      ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(labels, 0), logits)
      loss = tf.reduce_sum(ce * mask) / count
    grads = tape.gradient(loss, [v.value for v in variables])
    self.probe_optimizer.apply_gradients(zip(grads, variables))
    hit = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32)
    self.probe_loss_tracker.update_state(ce, mask)
    self.probe_acc_tracker.update_state(hit, mask)
