"""Test session set-up: the CPU is split into 4 logical devices before TensorFlow initialises, so
MirroredStrategy tests can run 1, 2 and 4 replicas in this one process."""

import functools
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf import distributed  # noqa: E402

LOGICAL_CPUS = 4
distributed.split_cpu(LOGICAL_CPUS)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def mirrored(n):
  """MirroredStrategy over the first n logical CPUs. TF assigns collective group keys per process,
  so a process may use only one replica count > 1; other counts run in subprocesses. The strategy
  is shared: a second one over the same devices would restart the collective instance keys and
  clash with the first ("Collective instance 100 expected type 2 ... but got type 0")."""
  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:n]]
  return tf.distribute.MirroredStrategy(devices)


@pytest.fixture
def repo():
  return REPO


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: subprocess / end-to-end runs (skip with -m 'not slow')")
