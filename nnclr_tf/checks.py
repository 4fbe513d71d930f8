"""The value checks shared by the config sections, NNCLRConfig and the start of pretraining: each
condition is written once and raises ConfigError naming the flag and the fix."""

from __future__ import annotations

from nnclr_tf.errors import ConfigError


def floats(value, flag, count=None):
  """A list/tuple of numbers or of numeric strings ("1.0", "0.1") -> tuple of floats."""
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  try:
    out = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    out = ()
  if not out or (count is not None and len(out) != count):
    want = "two probabilities, e.g. 1.0,0.1" if count == 2 else "numbers, e.g. 1e-4,1e-3"
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    raise ConfigError(f"--{flag}={text}: give {want}")
  return out


def pair_of_floats(value, flag):
  return floats(value, flag, 2)


def check_temperature(temperature):
  if temperature <= 0:
    raise ConfigError(f"--temperature={temperature} must be > 0 (the paper uses 0.1)")


def check_eval_crop_fraction(fraction):
  if not 0 < fraction <= 1:
    raise ConfigError(f"--eval_crop_fraction={fraction} must be in (0, 1] (ImageNet protocol: "
                      "0.875; 1.0 resizes the whole image)")


def check_nn_topk(nn_topk, queue_size):
  if not 1 <= nn_topk <= queue_size:
    raise ConfigError(f"--nn_topk={nn_topk} must be between 1 and --queue_size={queue_size}")


def check_probabilities(cfg, *names):
  for name in names:
    if not 0 <= getattr(cfg, name) <= 1:
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be a probability in [0, 1]")


def check_batch(global_batch, queue_size, replicas=1, nn_topk=1, num_examples=None):
  """Batch / support-set / replica consistency (static shapes need exact multiples). The
  Experiment checks it with one replica when it is made; pretraining again with its replicas."""
  if global_batch <= 0:
    raise ConfigError(f"--batch_size={global_batch} must be positive")
  check_replicas(global_batch, replicas)
  if queue_size < global_batch:
    raise ConfigError(f"--queue_size={queue_size} is smaller than --batch_size={global_batch}; "
                      "the support set must hold at least one global batch")
  if queue_size % global_batch:
    raise ConfigError(f"--queue_size={queue_size} must be a multiple of --batch_size="
                      f"{global_batch} (static-shape enqueue); try "
                      f"{max(1, queue_size // global_batch) * global_batch}")
  check_nn_topk(nn_topk, queue_size)
  if num_examples is not None:
    check_examples(global_batch, num_examples)


def check_replicas(global_batch, replicas, flag="batch_size"):
  """Every replica takes an equal share of the global batch (static shapes)."""
  if global_batch % replicas:
    raise ConfigError(f"--{flag}={global_batch} must be divisible by the {replicas} replicas; "
                      f"use a multiple of {replicas}")


def check_examples(global_batch, num_examples, flag="batch_size"):
  """An epoch holds at least one global batch."""
  if global_batch > num_examples:
    raise ConfigError(f"--{flag}={global_batch} is larger than the {num_examples} training "
                      "examples; lower it")
