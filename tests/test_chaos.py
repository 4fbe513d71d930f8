"""benchmarks/chaos.py, short: a 3-kill campaign on a small quickstart run (the 20-kill one is a
benchmark, its figures in benchmarks/RESULTS.md)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import chaos  # noqa: E402

SMALL = ["--width=8", "--proj_hidden_dim=64", "--pred_hidden_dim=64", "--embedding_dim=16",
         "--queue_size=256", "--train_steps=30", "--noplots",
         "--batch_size=32"]  # 46 steps an epoch: every resume of the 30 steps is mid-epoch


@pytest.mark.slow
def test_three_kills_end_bit_identical_to_an_uninterrupted_run(tmp_path, capsys):
  argv = [f"--workdir={tmp_path / 'chaos'}", "--kills=3", "--seed=5",
          "--kinds=checkpoint,features,export",
          "--checkpoint_every_steps=3", *(f"--run_flag={f}" for f in SMALL)]
  code = chaos.main(argv)
  out = json.loads(capsys.readouterr().out)
  assert code == 0 and out["ok"], out
  # The oracle is the uninterrupted run of the same command: tensor for tensor equal.
  assert out["bit_identical"] and out["final_checkpoint"] == "ckpt-30"
  # The checkpoint kill lands two intervals past the start, so a restart resumes mid-run (and
  # mid-epoch, where the uninterrupted run never began a dataset): the same batches from that
  # step are what makes the final checkpoint equal.
  assert out["kills_landed"]["checkpoint"] == 1 and out["resumed_mid_run"] >= 1, out["kills"]
  assert out["lost_steps"]["max"] <= 3 and out["leftover_temp_files"] == []
  assert out["exports_loaded"] and out["pretrain_results_steps"] == 30
