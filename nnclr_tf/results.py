"""The results of each mode, typed: what experiment's modes return, what `<mode>_results.json`
holds (the same keys), what cli.summary and model_dir read.

TypedDicts rather than dataclasses: a mode's results stay the plain dict they have always been
(`experiment.knn_eval(exp)["knn_top1"]`, `json.dumps(results)`), and mypy checks every key the
library writes or reads against these declarations. Every key is optional (total=False): a
figure exists only when its stage ran (kNN needs a labelled eval split, plots can be off).
"""

from __future__ import annotations

from typing import Any, TypedDict


class KnnFigures(TypedDict, total=False):
  """Weighted kNN of the trained encoder and of the architecture at random initialisation."""
  knn_top1: float
  knn_top5: float
  knn_top1_random_init: float
  knn_top5_random_init: float
  knn_k: int
  knn_temperature: float
  eval_examples: int
  knn_bank_examples: int


class TrainingFigures(TypedDict, total=False):
  """training.pretrain's figures of the fit (means over the last epoch's steps)."""
  steps: int
  epochs: float
  steps_per_epoch: int
  resumed_from_step: int
  final_loss: float | None
  nn_label_hit: float | None
  contrastive_acc: float | None
  nn_similarity: float | None
  pairs_per_sec: float | None


class PretrainResults(KnnFigures, TrainingFigures, total=False):
  """pretrain_results.json."""
  online_probe_acc: float | None
  knn_skipped: bool  # no labelled eval split (or a single class): kNN did not run
  plots: dict[str, str]  # name -> PNG path
  train_examples: int
  skipped_images: int
  skipped_eval_images: int
  global_batch: int
  replicas: int
  export_dir: str
  knn_curve: list[dict]  # --knn_every_steps: [{"step", "knn_top1"}] as curves.csv holds them
  knn_monitor_seconds: float  # what this process spent on them (not in pairs_per_sec)


class KnnEvalResults(KnnFigures, total=False):
  """knn_results.json."""
  checkpoint: str


class ProbeInfo(TypedDict, total=False):
  """linear_probe.fit_probe's record of the fit."""
  l2: float
  l2_val_top1: dict[str, float]
  iterations: int
  converged: bool
  train_top1: float
  train_examples: int


class LinearEvalResults(ProbeInfo, total=False):
  """linear_eval_results.json."""
  linear_top1: float
  linear_top5: float
  linear_top1_random_init: float
  linear_top5_random_init: float
  l2_random_init: float
  eval_examples: int
  feature_dim: int
  probe: str
  feature_cache: str | None
  checkpoint: str
  classifier_export_dir: str
  protocol: str             # --linear_protocol: lbfgs or sgd
  # --linear_protocol=sgd (linear_sgd.fit)
  epochs: int
  steps: int
  steps_per_epoch: int
  batch_size: int
  learning_rate: float      # the peak: --linear_lr x batch / 256
  resumed_from_step: int
  fit_seconds: float
  final_train_loss: float
  train_accuracy: float     # on the augmented views of the last epoch
  sgd_dir: str              # its checkpoints


class FinetuneRun(TypedDict, total=False):
  """One fine-tune run (finetune.finetune, with the encoder it started from)."""
  finetune_top1: float
  finetune_top5: float
  label_fraction: float
  subset: str  # the tfds dataset of a published subset, or which class-balanced draw
  labelled_examples: int
  labelled_per_class: list[int]  # [min, max]; not for a streamed (published) subset
  epochs: int
  steps: int
  batch_size: int
  learning_rate: float
  final_train_loss: float
  eval_examples: int
  init: str
  checkpoint: str | None


class FinetuneResults(FinetuneRun, total=False):
  """finetune_results.json: the latest run, and every (fraction, init) run by key."""
  by_label_fraction: dict[str, FinetuneRun]


class ExportResults(TypedDict, total=False):
  """export_results.json."""
  checkpoint: str
  encoder_export_dir: str
  encoder_export_bytes: int
  classifier_export_dir: str
  classifier_export_bytes: int


class PlotsResults(TypedDict, total=False):
  """--mode=plots (printed, not written: the PNGs are the result)."""
  plots: dict[str, str]
  checkpoint: str


class ContinuousEvalResults(TypedDict, total=False):
  """--mode=continuous_eval (printed; each checkpoint's line is in continuous_eval.jsonl)."""
  scored_steps: list[int]  # scored by this process
  last_step: int  # the newest step scored so far, by this process or an earlier one
  checkpoint: str  # of last_step
  knn_top1: float  # of last_step
  linear_top1: float  # of last_step, with --continuous_eval_linear
  timed_out: bool  # stopped by --eval_timeout before the run's last step
  results_file: str


RESULTS: dict[str, Any] = {
    "pretrain": PretrainResults, "knn_eval": KnnEvalResults, "linear_eval": LinearEvalResults,
    "finetune": FinetuneResults, "export": ExportResults, "plots": PlotsResults,
    "continuous_eval": ContinuousEvalResults}


def declared_keys(mode: str) -> set[str]:
  """Every key the mode's results may hold."""
  cls = RESULTS[mode]
  return set(cls.__required_keys__) | set(cls.__optional_keys__)
