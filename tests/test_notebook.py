"""notebooks/quickstart.ipynb runs end to end as written (the install cell finds nnclr_tf
importable and installs nothing) and its numbers are those of a trained encoder."""

import os
import re

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel imports this checkout's nnclr_tf, not an installed copy; it runs in tmp_path so
  # the exports land there.
  monkeypatch.setenv("PYTHONPATH", REPO)
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "pip install" not in text and "Successfully installed" not in text
  assert re.search(r"val_loss: [0-9.]+", text), text[-2000:]
  knn = float(re.search(r"kNN top-1: ([0-9.]+)", text).group(1))
  probe = float(re.search(r"linear probe top-1: ([0-9.]+)", text).group(1))
  assert knn > 0.5 and probe > 0.5, text[-2000:]  # 10 classes: chance is 0.1
  assert os.path.exists(tmp_path / "nnclr_export" / "encoder" / "1" / "saved_model.pb")
  assert os.path.exists(tmp_path / "nnclr_encoder.keras")
