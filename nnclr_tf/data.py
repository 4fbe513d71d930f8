"""The data layer's public names, as README, the notebooks and the other modules use them
(`from nnclr_tf import data; data.digits_source()`). Nothing is defined here:

- `nnclr_tf/sources.py`: the examples and how they are read (Source, StreamSource, the numpy,
  digits, folder and tfds sources, decoding, the in-memory cache, load_sources, the
  class-balanced validation split);
- `nnclr_tf/pipelines.py`: the tf.data pipelines over them (pretraining as a pure function of
  (seed, step), evaluation, and `pretraining_stream` for a user's own tf.data).
"""

from nnclr_tf.config import DataConfig
from nnclr_tf.errors import DataError
from nnclr_tf.pipelines import (
    distributed_linear_dataset,
    distributed_pretrain_dataset,
    eval_dataset,
    linear_dataset,
    one_view_encoded,
    pretrain_dataset,
    pretraining_stream,
    steps_per_epoch,
    two_views_encoded,
)
from nnclr_tf.sources import (
    IMAGE_EXTENSIONS,
    Source,
    StreamSource,
    bank_subset,
    cache_decoded,
    check_decodable,
    decode_error,
    decode_image,
    digits_source,
    folder_source,
    imagenet_subset_source,
    knn_bank_source,
    load_sources,
    numpy_source,
    split_balanced,
    tfds_source,
)

__all__ = [
    "DataConfig", "DataError", "IMAGE_EXTENSIONS", "Source", "StreamSource", "bank_subset",
    "cache_decoded", "check_decodable", "decode_error", "decode_image", "digits_source",
    "distributed_linear_dataset", "distributed_pretrain_dataset", "eval_dataset",
    "folder_source", "imagenet_subset_source", "knn_bank_source", "linear_dataset",
    "load_sources", "numpy_source", "one_view_encoded", "pretrain_dataset", "pretraining_stream",
    "split_balanced", "steps_per_epoch", "tfds_source", "two_views_encoded",
]
