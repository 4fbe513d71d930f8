"""What a rerun of pretraining skips: a finished run is detected from its files alone."""

import os

import tensorflow as tf

from nnclr_tf import export
from nnclr_tf import model_dir as md
from nnclr_tf.config import TrainConfig
from nnclr_tf.pretraining import finished_pretraining


def test_a_run_is_finished_only_with_checkpoint_results_and_export(tmp_path):
  d = str(tmp_path)
  t = TrainConfig(model_dir=d, train_steps=4)
  assert finished_pretraining(t, plots_enabled=False) is None
  with open(os.path.join(d, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-4"\n')
  tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(os.path.join(d, "ckpt-4"))
  enc = os.path.join(d, "export", "encoder", "1")
  os.makedirs(os.path.dirname(os.path.join(enc, export.METADATA_FILE)))
  md.write_results(d, "pretrain", {"steps": 4, "knn_top1": 0.8, "export_dir": enc})
  assert finished_pretraining(t, plots_enabled=False) is None  # the export lacks its step
  md.write_json(os.path.join(enc, export.METADATA_FILE), {"checkpoint_step": 4})
  assert "finished at step 4" in finished_pretraining(t, plots_enabled=False)
  assert finished_pretraining(t, plots_enabled=True) is None  # no plots yet
  assert finished_pretraining(TrainConfig(model_dir=d, train_steps=6), False) is None
  # A damaged final checkpoint: not finished (the rerun resumes from the newest intact one).
  open(os.path.join(d, "ckpt-4.data-00000-of-00001"), "w").close()
  assert finished_pretraining(t, plots_enabled=False) is None
