"""nnclr_tf.data is a facade: its names live in sources, pipelines, config and errors."""

import os
import re

from conftest import REPO
from nnclr_tf import config, data, errors, pipelines, sources

HOMES = {
    sources: ["IMAGE_EXTENSIONS", "Source", "StreamSource", "bank_subset", "cache_decoded",
              "check_decodable", "decode_error", "decode_image", "digits_source", "folder_source",
              "imagenet_subset_source",
              "knn_bank_source", "load_sources", "numpy_source", "split_balanced", "tfds_source"],
    pipelines: ["distributed_linear_dataset", "distributed_pretrain_dataset", "eval_dataset",
                "linear_dataset", "one_view_encoded", "pretrain_dataset", "pretraining_stream",
                "steps_per_epoch", "two_views_encoded"],
    config: ["DataConfig"],
    errors: ["DataError"],
}


def test_every_reexported_name_is_its_home_modules_object():
  assert sorted(data.__all__) == sorted(n for names in HOMES.values() for n in names)
  for home, names in HOMES.items():
    for name in names:
      obj = getattr(data, name)
      assert obj is getattr(home, name), name
      # Defined there, not passed on from a third module.
      assert getattr(obj, "__module__", home.__name__) == home.__name__, name
  # Nothing else: a name defined in the facade would be a second home.
  public = {n for n in vars(data) if not n.startswith("_")}
  assert public == set(data.__all__)


def test_every_data_name_the_repository_uses_is_reexported():
  # `data.<name>` as README, the notebook, benchmarks, tests and the library write it
  # (test_docs.py names a missing one on purpose; `data.py` is the file).
  used = {}
  for top in ("nnclr_tf", "tests", "benchmarks", "notebooks", "README.md", "CONTRIBUTING.md"):
    path = os.path.join(REPO, top)
    files = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
        if f.endswith((".py", ".md", ".ipynb"))]
    for f in files:
      if os.path.basename(f) in ("test_docs.py", "test_data.py"):
        continue
      for name in re.findall(r"(?<![\w.])data(?:_lib)?\.(\w+)", open(f).read()):
        used.setdefault(name, f)
  used.pop("py", None)
  assert "pretrain_dataset" in used and "digits_source" in used  # the scan finds them
  missing = {n: os.path.relpath(f, REPO) for n, f in used.items() if n not in data.__all__}
  assert not missing, missing
