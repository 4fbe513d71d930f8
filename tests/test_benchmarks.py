"""Smoke tests of the benchmark scripts: tiny settings, in this process (no TF start-up per
script), the one JSON line parsed and checked for consistency. No timing is asserted."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import input_pipeline  # noqa: E402
import knn_memory  # noqa: E402
import nn_overhead  # noqa: E402
import peak  # noqa: E402
import throughput  # noqa: E402

import peer_compare  # noqa: E402

pytestmark = pytest.mark.slow  # each benchmark script end to end, tiny

TINY = ["--backbone=small_cnn", "--width=8", "--image_size=16", "--proj_hidden_dim=32",
        "--pred_hidden_dim=32", "--embedding_dim=16", "--batch_size=16", "--warmup=1"]


def json_line(capsys):
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert len(lines) == 1
  return json.loads(lines[0])


def test_throughput_reports_a_consistent_step(capsys):
  throughput.main([*TINY, "--queue_size=64", "--steps=2", "--peak_sizes=128"])
  r = json_line(capsys)
  assert r["pairs_per_sec"] > 0 and np.isfinite(r["loss_last"])
  assert r["pairs_per_sec"] * r["step_ms"] == pytest.approx(16 * 1000, rel=1e-6)
  assert len(r["step_ms_all"]) == 2 and r["step_ms"] >= r["step_ms_min"] > 0
  # small_cnn width 8 at 16 px, by hand: 3x3 convs 3->8 (16x16), 8->16 (8x8), 16->32 (4x4).
  backbone = 2 * (16 * 16 * 27 * 8 + 8 * 8 * 72 * 16 + 4 * 4 * 144 * 32)
  assert r["flops"]["backbone_forward_gflop_per_image"] * 1e9 == pytest.approx(backbone)
  heads = 2 * (32 * 32 + 32 * 32 + 32 * 16 + 16 * 32 + 32 * 16)  # proj 32-32-32-16, pred 16-32-16
  assert r["flops"]["heads_forward_gflop_per_image"] * 1e9 == pytest.approx(heads)
  assert r["flops"]["nn_lookup_gflop"] * 1e9 == pytest.approx(2 * 2 * 16 * 64 * 16)
  stem = 2 * 16 * 16 * 27 * 8
  step = 32 * (3 * (backbone + heads) - stem) + 2 * 2 * 16 * 64 * 16 + 4 * 2 * 16 * 16 * 16
  assert r["flops"]["step_gflop"] * 1e9 == pytest.approx(step)
  assert r["achieved_gflops"] == pytest.approx(r["flops"]["step_gflop"] / r["step_ms"] * 1000)
  assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / r["peak_gflops"])
  assert r["fraction_of_peak_cpu"] == pytest.approx(r["achieved_gflops_per_cpu_s"] /
                                                   r["peak_gflops_per_cpu_s"])
  assert r["peak_rss_mb"] > 100 and r["tf_version"] and r["device"]["cores"] >= 1
  assert r["settings"]["queue_size"] == 64 and r["settings"]["use_nn"] is True


def test_nn_overhead_compares_with_and_without_the_lookup(capsys):
  nn_overhead.main([*TINY, "--queue_sizes=64", "--steps=1", "--rounds=1", "--warmup=1"])
  r = json_line(capsys)
  res = r["results"]
  assert set(res) == {"no_nn", "nn_64"}
  assert res["no_nn"]["use_nn"] is False and res["nn_64"]["queue_size"] == 64
  assert res["nn_64"]["ratio_to_no_nn"] == pytest.approx(res["nn_64"]["step_ms"] /
                                                         res["no_nn"]["step_ms"])
  assert res["no_nn"]["flops"]["nn_lookup_gflop"] == 0
  assert r["ratio_at"]["64"] == res["nn_64"]["ratio_to_no_nn"] > 0


def test_input_pipeline_on_a_small_folder(tmp_path, capsys):
  import tensorflow as tf
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(tmp_path / "train" / c)
    for i in range(8):
      img = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
      tf.io.write_file(str(tmp_path / "train" / c / f"{i}.jpg"), tf.io.encode_jpeg(img))
  large = tmp_path / "large"
  input_pipeline.main([f"--image_dir={tmp_path / 'train'}", "--images=12", "--image_size=16",
                       "--modes=cached",
                       "--batch_size=4", "--large_size=24", "--large_images=8",
                       f"--large_dir={large}", "--large_batch_size=4", "--cores=1",
                       "--warmup_batches=1", "--batches=1", "--stage_profile"])
  line = json_line(capsys)
  # Each core count in a process started on that many CPUs (here one, whatever this machine has).
  assert line["process_cpus_by_cores"] == {"1": 1}
  r = line["results"]
  assert set(r) == {"16px_cached", "24px_files"}  # 24 px decodes files every time
  profile = r["24px_files"]["stage_ms_per_pair"]
  assert set(profile) == {"full", "decode_only", "jitter", "grayscale", "blur", "solarize"}
  assert profile["full"] > 0 and profile["decode_only"] > 0
  assert r["16px_cached"]["images"] == 12 and r["24px_files"]["images"] == 8
  for v in r.values():
    assert v["pairs_per_sec_by_cores"]["1"] > 0
  large_r = r["24px_files"]
  assert large_r["full_over_decode_only"]["1"] == pytest.approx(
      large_r["pairs_per_sec_by_cores"]["1"] / large_r["decode_only_pairs_per_sec_by_cores"]["1"])
  files = [os.path.join(d, f) for d, _, fs in os.walk(large) for f in fs]
  assert len(files) == 8
  assert tf.io.decode_jpeg(tf.io.read_file(files[0])).shape == (24, 24, 3)


def test_the_options_a_core_count_s_process_is_started_without():
  argv = ["--cores=1,2", "--images", "8", "--stage_profile", "--cores", "2", "--batches=3",
          "--stage_profile_x=1"]
  assert input_pipeline._without(argv, ("--cores",), ("--stage_profile",)) == [
      "--images", "8", "--batches=3", "--stage_profile_x=1"]


def test_core_counts_results_are_merged_side_by_side():
  one = {"results": {"a": {"images": 8, "by_cores": {"1": 10.0}}}, "cores": [1]}
  two = {"results": {"a": {"images": 8, "by_cores": {"2": 19.0}, "profile": {"x": 1}}},
         "cores": [2]}
  assert input_pipeline._merged(one, two) == {
      "results": {"a": {"images": 8, "by_cores": {"1": 10.0, "2": 19.0}, "profile": {"x": 1}}},
      "cores": [1]}


def test_peak_measures_both_dtypes():
  out = peak.measure((64,), ("float32", "bfloat16"), seconds=0.01, repeats=1)
  assert out["float32"]["gflops"] > 0 and out["bfloat16"]["gflops"] > 0
  assert out["float32"]["by_size"]["64"] == out["float32"]["gflops"]
  assert out["float32"]["gflops_per_cpu_s"] > 0
  assert peak.machine()["cores"] >= 1


def test_peer_compare_runs_both_in_rounds_and_divides_medians(tmp_path, capsys):
  # A stand-in for the peer's script (its output format), so the smoke needs no PyTorch; ours is
  # the real benchmarks/throughput.py in a subprocess, on the tiny model.
  peer_dir = tmp_path / "peer"
  peer_dir.mkdir()
  (peer_dir / "throughput.py").write_text(
      "import json, sys\n"
      "print('log line')\n"
      "print(json.dumps({'train_step': {'pairs_per_s_median': 10.0}, 'argv': sys.argv[1:]}))\n")
  ours = " ".join(f for f in TINY if not f.startswith(("--batch_size", "--warmup")))
  peer_compare.main([f"--peer_python={sys.executable}", f"--peer_dir={peer_dir}", "--rounds=2",
                     "--steps=1", "--warmup=1", "--batch_size=16", "--queue_size=64",
                     f"--ours_flags={ours} --peak_sizes=128"])
  r = json_line(capsys)
  assert len(r["rounds"]) == 2 and r["peer_median_pairs_per_sec"] == 10.0
  ours_pps = [x["ours_pairs_per_sec"] for x in r["rounds"]]
  assert all(p > 0 for p in ours_pps)
  assert r["round_ratios"] == pytest.approx([p / 10.0 for p in ours_pps])
  assert r["ratio_of_medians"] == pytest.approx(float(np.median(ours_pps)) / 10.0)
  assert r["rounds"][0]["peer_result"]["argv"][:4] == ["--batch_size", "16", "--steps", "1"]
  assert "--malloc_tune" in r["peer_cmd"]  # the peer's best setting by default
  assert peer_compare.last_json_line('x\n{"a": 1}\n{bad\n') == {"a": 1}


def test_knn_memory_bank_mode_agrees_with_its_float32_reference(capsys):
  """The float16 bank mode at toy size: chunks that do not divide the bank, the independent
  float32 reference agreeing on top-1, and a peak measured against the bank's size."""
  knn_memory.main(["--mode=bank", "--bank=3000", "--dim=32", "--classes=10", "--queries=40",
                   "--ref_queries=20", "--chunk=700", "--k=20", "--noise=1.5"])
  r = json_line(capsys)
  assert r["bank"] == 3000 and r["ref_queries"] == 20
  assert r["ref_top1_agree"] >= 19 and abs(r["knn_top1"] - r["ref_knn_top1"]) <= 0.1
  assert r["peak_increase_mb"] >= 0 and r["bank_float16_mb"] == round(3000 * 32 * 2 / 2 ** 20)


def test_parity_carves_a_shared_split_and_scores_both_sides(tmp_path, capsys):
  import parity
  from PIL import Image
  source = tmp_path / "source"
  for c in ("a", "b", "c"):
    (source / c).mkdir(parents=True)
    for i in range(12):
      Image.fromarray(np.full((16, 16, 3), 8 * i + 70 * "abc".index(c), np.uint8)).save(
          source / c / f"{i:02d}.png")
  # A stand-in for the peer's knn_budget.py (its output format; it echoes its arguments), so the
  # smoke needs no PyTorch; ours is the real experiment on a tiny model.
  peer_dir = tmp_path / "peer"
  peer_dir.mkdir()
  (peer_dir / "knn_budget.py").write_text(
      "import json, sys\n"
      "a = sys.argv[1:]\n"
      "print('step 1 ep 0 2s loss 5.7', file=sys.stderr)\n"
      "print('step 10 ep 0 1s loss 5.0', file=sys.stderr)\n"
      "curve = ([{'step': int(a[a.index('--eval_at') + 1]), 'knn_top1': 0.3}]\n"
      "         if '--eval_at' in a else None)\n"
      "print(json.dumps({'knn_top1_before': 0.2, 'knn_top1_after': 0.5, 'argv': a,\n"
      "  'knn_curve': curve,\n"
      "  'train': {'steps': int(a[a.index('--steps') + 1]), 'pairs_per_s': 30.0,\n"
      "            'train_seconds': 10.0},\n"
      "  'config': {'train_images': 28, 'test_images': 8}}))\n")
  split, results = tmp_path / "split", tmp_path / "r.jsonl"
  tiny = ["backbone=small_cnn", "width=8", "image_size=16", "proj_hidden_dim=32",
          "pred_hidden_dim=32", "embedding_dim=16", "queue_size=64", "knn_k=5", "verbose=0"]
  common = [f"--source={source}", f"--split_dir={split}", "--val_images=8", "--steps=2",
            "--batch_size=8", f"--work_dir={tmp_path / 'runs'}", f"--results={results}",
            f"--peer_python={sys.executable}", f"--peer_dir={peer_dir}"]
  parity.main([*common, "--side=both", "--eval_at=1", *[f"--override={o}" for o in tiny]])
  out, err = capsys.readouterr()
  peer, ours = [json.loads(line) for line in out.splitlines()]
  assert "peer: step 10 ep 0 1s loss 5.0" in err.splitlines()  # its progress, passed on
  val = sorted(p.relative_to(split / "val") for p in (split / "val").rglob("*.png"))
  train = sorted(p.relative_to(split / "train") for p in (split / "train").rglob("*.png"))
  assert len(val) == 8 and len(train) == 28 and not set(val) & set(train)
  assert sorted(len(list((split / "val" / c).iterdir())) for c in "abc") == [2, 3, 3]
  assert (split / "val" / val[0]).resolve() == source / val[0]
  assert peer["side"] == "peer" and peer["knn_top1"] == 0.5 and peer["pairs_per_s"] == 30.0
  # Ours's convention on the peer's figures: 1 step of 8 pairs after step 1 ended at 2 s of 10.
  assert peer["pairs_per_s_after_first_step"] == pytest.approx(8 / (10 - 2))
  assert peer["peer_cmd"][2:6] == ["--train_dir", str(split / "train"), "--eval_dir",
                                   str(split / "val")] and "--malloc_tune" in peer["peer_cmd"]
  assert ours["side"] == "ours" and ours["steps_done"] == 2 and 0 <= ours["knn_top1"] <= 1
  assert ours["train_images"] == 28 and ours["eval_images"] == 8 and ours["pairs_per_s"] > 0
  assert ours["pairs_per_s_after_first_step"] == ours["pairs_per_s"]
  assert ours["settings"] == {"use_nn": True, "symmetric_loss": True,  # the lightly preset's
                              "weight_decay_mode": "coupled", "zero_init_residual": False,
                              "queue_size": 64}
  # --eval_at: the peer is asked for its curve; ours scores kNN at every multiple of the gcd of
  # the points and the last step, each point with the NN label-hit of the steps up to it.
  assert peer["knn_curve"] == [{"step": 1, "knn_top1": 0.3}]
  assert peer["peer_cmd"][-2:] == ["--eval_at", "1"]
  assert [p["step"] for p in ours["knn_curve"]] == [1, 2] and ours["knn_monitor_seconds"] > 0
  assert ours["knn_curve"][-1]["knn_top1"] == pytest.approx(ours["knn_top1"], abs=1e-9)
  assert all(0 <= p["nn_label_hit"] <= 1 for p in ours["knn_curve"])
  # A later part of the protocol reuses the split and appends; the summary groups by setting.
  parity.main([*common, "--side=peer", "--seed=1"])
  with pytest.raises(SystemExit, match="another --split_dir"):
    parity.main([*common, "--side=peer", "--val_images=9"])
  with pytest.raises(SystemExit):  # the ablations change our side only
    parity.main([*common, "--side=both", "--use_nn=false"])
  failing = tmp_path / "failing"
  failing.mkdir()
  (failing / "knn_budget.py").write_text(
      "import sys\nprint('ValueError: no images', file=sys.stderr)\nsys.exit(3)\n")
  with pytest.raises(SystemExit, match="the peer exited 3:\nValueError: no images"):
    parity.main([*common, "--side=peer", f"--peer_dir={failing}"])
  capsys.readouterr()
  parity.main([f"--results={results}", "--summary"])
  groups = {g["side"]: g for g in json_line(capsys)["groups"]}
  assert groups["peer"]["runs"] == 2 and groups["peer"]["seeds"] == [0, 1]
  assert groups["peer"]["knn_top1_mean"] == 0.5 and groups["ours"]["runs"] == 1
  assert groups["peer"]["pairs_per_s_after_first_step_mean"] == pytest.approx(1.0)
  # A line written before the preset's zero_init_residual changed ran with it on: its own group.
  with open(results, "a") as f:
    f.write(json.dumps({"side": "ours", "steps": 2, "seed": 0, "knn_top1": 0.1, "pairs_per_s": 1,
                        "settings": {k: ours["settings"][k] for k in parity.ABLATIONS}}) + "\n")
  parity.main([f"--results={results}", "--summary"])
  ours_groups = [g for g in json_line(capsys)["groups"] if g["side"] == "ours"]
  assert sorted(g["settings"]["zero_init_residual"] for g in ours_groups) == [False, True]
  assert [g["knn_top1"] for g in ours_groups if g["settings"]["zero_init_residual"]] == [[0.1]]


def test_peer_and_data_defaults_are_the_shared_folder_beside_the_repository():
  # The brief's layout: the project's ../shared holds peers/lightly and data/cifar10/train. A wrong
  # number of ".." once sent the documented parity command to /shared.
  import parity
  shared = os.path.normpath(os.path.join(REPO, "..", "shared"))
  assert parity.DEFAULT_SOURCE == os.path.join(shared, "data", "cifar10", "train")
  for default in (parity.DEFAULT_PEER_DIR, peer_compare.DEFAULT_PEER_DIR):
    assert default == os.path.join(shared, "peers", "lightly")
  if os.path.isdir(shared):
    assert os.path.isfile(os.path.join(parity.DEFAULT_PEER_DIR, "knn_budget.py"))


def test_curves_report_tables_and_plots_each_run_with_a_curve(tmp_path, capsys):
  import curves
  results, png = tmp_path / "curves.jsonl", tmp_path / "curves.png"
  lines = [
      {"side": "peer", "seed": 0, "steps": 600, "seconds": 3000.0, "pairs_per_s": 30.0,
       "knn_curve": [{"step": 150, "knn_top1": 0.31}, {"step": 600, "knn_top1": 0.45}]},
      {"side": "ours", "seed": 0, "steps": 600, "seconds": 2400.0, "pairs_per_s": 35.0,
       "settings": {"use_nn": True, "queue_size": 4096},
       "knn_curve": [{"step": 150, "knn_top1": 0.32, "nn_label_hit": 0.12},
                     {"step": 600, "knn_top1": 0.46, "nn_label_hit": 0.2}]},
      {"side": "ours", "seed": 0, "steps": 600, "seconds": 2400.0, "pairs_per_s": 36.0,
       "settings": {"use_nn": False, "queue_size": 1024},
       "knn_curve": [{"step": 600, "knn_top1": 0.47, "nn_label_hit": 0.0}]},
      {"side": "ours", "seed": 0, "steps": 300, "knn_top1": 0.4},  # no curve: not a run here
  ]
  results.write_text("".join(json.dumps(line) + "\n" for line in lines))
  curves.main([f"--results={results}", f"--plot={png}"])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ("| run | seed | kNN @ 150 | kNN @ 600 | NN hit @ 150 | NN hit @ 600 | "
                    "pairs/s | wall min |")
  assert out[2] == "| lightly NNCLR | 0 | 0.3100 | 0.4500 |  |  | 30.0 | 50 |"
  assert out[3] == "| ours NNCLR | 0 | 0.3200 | 0.4600 | 0.120 | 0.200 | 35.0 | 40 |"
  assert out[4].startswith("| ours SimCLR, support set 1024 | 0 |  | 0.4700 |")
  report = json.loads(out[-1])
  assert report["benchmark"] == "curves_report" and len(report["runs"]) == 3
  assert png.stat().st_size > 10_000
  (tmp_path / "none.jsonl").write_text(json.dumps(lines[-1]) + "\n")
  with pytest.raises(SystemExit, match="no run with a knn_curve"):
    curves.main([f"--results={tmp_path / 'none.jsonl'}", "--plot="])
