"""Augmented pairs per second of the real pretraining input pipeline
(nnclr_tf.data.pretrain_dataset:
index shuffle, decode, BYOL augmentation of two views, batch), per number of cores.

Two image sets:
  32 px   the CIFAR-10 training JPEGs, read in place (default ../shared/data/cifar10/train):
          `cached`, as run.py does when the decoded set fits --cache_limit_mb (decode once, then
          augment from memory), and `files` (decode every JPEG every time);
  224 px  larger JPEGs made from them (upsampled, written once to --large_dir in /tmp), decoded
          every time, as a set too large to cache would be; beside the full pipeline, the same
          with decode + crop + resize + flip only (`decode_only`), and full / decode_only: how
          close augmentation is to free on the host.

Each core count c runs in a process of its own started on c CPUs (as on a machine with c cores:
TensorFlow sizes its thread pools, which the colour stage's convolutions and XLA loops use, from
the CPUs it starts on), the pipeline on a private tf.data thread pool of c threads.
--stage_profile adds, on one core, what each colour stage of the 224 px pipeline costs.

  python benchmarks/input_pipeline.py --image_dir=../shared/data/cifar10/train
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak  # noqa: E402

import common  # noqa: E402  (sets the TF environment before TensorFlow is imported)
import run_settings  # noqa: E402

DEFAULT_DIR = os.path.join(common.REPO, "..", "shared", "data", "cifar10", "train")
# The 32 px set's image size, batch and seed: the CIFAR-10 ResNet-18 recipe's, whose pipeline the
# input-pipeline target is set against.
PRESET = "cifar10_resnet18"
# --augment / --large_augment name the preset whose augmentation runs: cifar is BYOL without blur
# at 32 px, byol the paper's BYOL pipeline (ImageNet, whose image size the 224 px comparison uses).
AUGMENT_PRESETS = {"cifar": "cifar10_resnet18", "byol": "imagenet_resnet50"}


def augment_config(name):
  from nnclr_tf.config import Experiment
  return Experiment.from_flagfile(AUGMENT_PRESETS[name]).augment


def decode_only(aug):
  """`aug` with decode, crop, resize and flip only (the colour, grayscale, blur and solarize
  stages off: a static probability 0 skips an op), the floor the full pipeline is held against;
  the views of the supervised protocols."""
  from nnclr_tf import augment
  return augment.crop_flip(aug)


def subset_source(image_dir, images, seed=0):
  """The first `images` files of a class-balanced seeded sample of a folder source."""
  import numpy as np

  from nnclr_tf import data
  src = data.folder_source(image_dir)
  if images and images < len(src):
    src = src.subset(np.sort(np.random.default_rng(seed).permutation(len(src))[:images]))
  return src


def make_large_jpegs(source, out_dir, size, quality=90):
  """Writes each image of `source` upsampled to size x size as JPEG under out_dir/<class>/.
  Reuses the folder when it already holds that many files."""
  import tensorflow as tf

  from nnclr_tf import data
  existing = sum(len(f) for _, _, f in os.walk(out_dir)) if os.path.isdir(out_dir) else 0
  if existing >= len(source):
    return out_dir
  names = source.class_names or ["all"]
  for i, (path, label) in enumerate(zip(source.paths, source.labels)):
    image = data.decode_image(tf.io.read_file(path))
    big = tf.image.resize(image[None], [size, size], method="bicubic")[0]
    big = tf.cast(tf.clip_by_value(tf.round(big), 0, 255), tf.uint8)
    folder = os.path.join(out_dir, names[max(int(label), 0)])
    os.makedirs(folder, exist_ok=True)
    tf.io.write_file(os.path.join(folder, f"{i:06d}.jpg"),
                     tf.io.encode_jpeg(big, quality=quality))
  return out_dir


def pairs_per_sec(source, aug, image_size, batch, cores, warmup_batches, batches, seed=0,
                  make=None):
  """Pairs/s of pretrain_dataset (or of the dataset `make()` returns) on a private pool of
  `cores` threads, after warm-up batches (main runs it in a process that holds `cores` CPUs)."""
  import tensorflow as tf

  from nnclr_tf import data
  ds = make() if make else data.pretrain_dataset(source, aug, image_size, batch, seed)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  it = iter(ds.with_options(options))
  for _ in range(warmup_batches):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  b["view1"].numpy()
  return batch * batches / (time.perf_counter() - t)


def imagenet_shaped_jpegs(out_dir, images):
  """`images` JPEGs of 200-500 px (benchmarks/synthetic_imagenet.py) under out_dir/<class>/."""
  import numpy as np
  import synthetic_imagenet
  import tensorflow as tf
  existing = sum(len(f) for _, _, f in os.walk(out_dir)) if os.path.isdir(out_dir) else 0
  rng = np.random.default_rng(0)
  for i in range(existing, images):
    folder = os.path.join(out_dir, synthetic_imagenet.CLASSES[i % 10])
    os.makedirs(folder, exist_ok=True)
    image = synthetic_imagenet.make_image(rng, i % 10)
    tf.io.write_file(os.path.join(folder, f"{i:06d}.jpg"), tf.io.encode_jpeg(image, quality=90))
  return out_dir


def wave1_dataset(source, aug, image_size, batch, seed=0):
  """The pipeline before crop-window decoding, same index order and seeds: every JPEG decoded
  whole and converted to float32 before the two views crop it."""
  import tensorflow as tf

  from nnclr_tf import augment, data
  paths, n = tf.constant(source.paths), len(source)

  def element(i):
    example = tf.random.experimental.index_shuffle(i % n, tf.stack([tf.constant(seed, tf.int64),
                                                                    i // n]), n - 1)
    image = tf.image.convert_image_dtype(
        data.decode_image(tf.io.read_file(tf.gather(paths, example))), tf.float32)
    v1, v2 = augment.two_views(image, augment.example_seed(seed, i // n, example), image_size,
                               aug)
    return {"view1": v1, "view2": v2}

  ds = tf.data.Dataset.range(tf.int64.max).map(element, num_parallel_calls=tf.data.AUTOTUNE,
                                               deterministic=True)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def compare_224(args, cores):
  """Pairs/s at 224 px on ImageNet-shaped JPEGs: wave-1 pipeline, full decode of the new
  pipeline (uint8 crop before float) and crop-window decoding, back to back per core count."""
  from nnclr_tf import data, pipelines
  from nnclr_tf.config import Experiment
  src = data.folder_source(imagenet_shaped_jpegs(args.imagenet_dir, args.imagenet_images))
  imagenet = Experiment.from_flagfile(AUGMENT_PRESETS["byol"])
  aug, size = imagenet.augment, imagenet.data.image_size
  out = {"images": len(src), "batch_size": args.large_batch_size, "dir": args.imagenet_dir,
         "pairs_per_sec_by_cores": {}}
  for c in cores:
    row = {}
    for name in args.imagenet_modes.split(","):
      pipelines.FUSED_JPEG_CROP = name != "uint8_full_decode"
      make = (lambda: wave1_dataset(src, aug, size, args.large_batch_size)) if name == "wave1" \
          else None
      row[name] = pairs_per_sec(src, aug, size, args.large_batch_size, c, args.warmup_batches,
                                args.batches, make=make)
    pipelines.FUSED_JPEG_CROP = True
    out["pairs_per_sec_by_cores"][str(c)] = row
  return out


def without(aug, stage):
  """`aug` with one colour stage off (static probability 0)."""
  import dataclasses
  off = {"jitter": {"jitter_prob": 0.0}, "grayscale": {"grayscale_prob": 0.0},
         "blur": {"blur_prob": (0.0, 0.0)}, "solarize": {"solarize_prob": (0.0, 0.0)}}[stage]
  return dataclasses.replace(aug, **off)


def stage_profile(source, aug, args):
  """Where the full pipeline's time goes on one core, in ms per pair: the full pipeline, the
  decode-only one, and for each colour stage what turning it off saves (full minus without)."""
  def ms(a):
    return 1000.0 / pairs_per_sec(source, a, args.large_size, args.large_batch_size, 1,
                                  args.warmup_batches, args.batches)

  full = ms(aug)
  out = {"full": full, "decode_only": ms(decode_only(aug))}
  for stage in ("jitter", "grayscale", "blur", "solarize"):
    out[stage] = full - ms(without(aug, stage))
  return out


def parser():
  # The images are a folder of class sub-folders (the preset names tfds cifar10, which is not
  # prepared here): the CIFAR-10 JPEGs beside the repository unless --image_dir says otherwise.
  ap = run_settings.Parser(PRESET, ("image_dir", "image_size", "batch_size", "seed"),
                           overrides={"dataset": "folder", "image_dir": DEFAULT_DIR},
                           description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=8192, help="images sampled from --image_dir")
  ap.add_argument("--augment", default="cifar", choices=sorted(AUGMENT_PRESETS),
                  help="augmentation at --image_size, a preset's: cifar (cifar10_resnet18, BYOL "
                       "without blur) or byol (imagenet_resnet50, the paper's)")
  ap.add_argument("--modes", default="cached,files")
  ap.add_argument("--large_size", type=int, default=224, help="0 skips the large-JPEG set")
  ap.add_argument("--large_images", type=int, default=1024)
  ap.add_argument("--large_augment", default="byol", choices=sorted(AUGMENT_PRESETS))
  ap.add_argument("--large_dir", default="/tmp/nnclr_bench_jpeg224")
  ap.add_argument("--large_batch_size", type=int, default=64)
  ap.add_argument("--cores", default="", help="comma-separated core counts (default 1..all)")
  ap.add_argument("--warmup_batches", type=int, default=2)
  ap.add_argument("--batches", type=int, default=4)
  ap.add_argument("--stage_profile", action="store_true",
                  help="also profile the large set's stages on one core (ms per pair)")
  ap.add_argument("--imagenet_images", type=int, default=0,
                  help="> 0: also compare pipelines at 224 px on this many ImageNet-shaped JPEGs")
  ap.add_argument("--imagenet_dir", default="/tmp/nnclr_bench_imagenet_shaped")
  ap.add_argument("--imagenet_modes", default="wave1,uint8_full_decode,crop_windows")
  return ap


CHILD = "NNCLR_INPUT_PIPELINE_CHILD"  # set in a core count's process: it runs, never spawns


def _without(argv, options=(), flags=()):
  """argv without the `options` (--name=value or --name value) and the bare `flags`."""
  out, skip = [], False
  for a in argv:
    name = a.split("=", 1)[0]
    if skip or name in flags:
      skip = False
    elif name in options:
      skip = "=" not in a
    else:
      out.append(a)
  return out


def _merged(a, b):
  """b's results put into a's: the per-core-count rates side by side, the rest a's (or b's)."""
  for key, value in b.items():
    if isinstance(value, dict) and isinstance(a.get(key), dict):
      _merged(a[key], value)
    elif key not in a:
      a[key] = value
  return a


def in_processes(argv, cores, stage_profile, settings):
  """The benchmark once per core count c, each in a new process started on c CPUs, and one
  result line of them all. TensorFlow sizes its intra-op pool, which oneDNN's convolutions and
  XLA's loops use even inside tf.data (they do not keep to its max_intra_op_parallelism), from
  the CPUs it starts on: a process that started on 2 and is then held to 1 splits the colour
  stage over two threads on one core (after a 2-core run, 38% of the 1-core run's CPU time was
  in that pool, and the 224 px pipeline made 677 pairs/s against 784 in a process started on
  one core). A machine with c cores is a process that starts on c."""
  import subprocess
  allowed = sorted(os.sched_getaffinity(0))
  if max(cores) > len(allowed):
    raise SystemExit(f"--cores={','.join(map(str, cores))}: this process has {len(allowed)} "
                     "CPUs")
  base = _without(argv, options=("--cores",), flags=("--stage_profile",))
  out, load_before, rss = None, peak.load_average(), 0.0
  for c in cores:
    cpus = set(allowed[:c])
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *base, f"--cores={c}",
         *(["--stage_profile"] if stage_profile and c == 1 else [])],
        stdout=subprocess.PIPE, text=True, env={**os.environ, CHILD: "1"},
        preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus))
    if child.returncode != 0:
      raise SystemExit(f"the {c}-core run of input_pipeline.py failed (exit {child.returncode})")
    line = json.loads(child.stdout.strip().splitlines()[-1])
    rss = max(rss, line.pop("peak_rss_mb", 0.0))
    out = line if out is None else _merged(out, line)
  out.update(cores=cores, settings=settings, peak_rss_mb=rss, load_average_before=load_before,
             load_average_after=peak.load_average(), processes="one per core count")
  print(json.dumps(out))


def main(argv=None):
  ap = parser()
  args, exp = ap.parse(argv)
  image_dir, size, batch = exp.data.image_dir, exp.data.image_size, exp.train.batch_size
  imagenet_only = args.imagenet_images and not args.modes and not args.large_size
  if not imagenet_only and not os.path.isdir(image_dir):
    ap.error(f"--image_dir={image_dir} is not a directory; point it at CIFAR-10 train")
  available = len(os.sched_getaffinity(0))
  cores = ([int(c) for c in args.cores.split(",")] if args.cores
           else [2] if imagenet_only else list(range(1, available + 1)))
  if args.stage_profile and not imagenet_only and 1 not in cores:
    cores = [1, *cores]  # the profile is of one core, in a process that holds one
  if cores != [available] and not os.environ.get(CHILD):
    return in_processes(sys.argv[1:] if argv is None else argv, cores, args.stage_profile,
                        ap.settings(args, exp))
  import tensorflow as tf
  if imagenet_only:
    print(json.dumps({"benchmark": "input_pipeline_224_imagenet_shaped",
                      "results": compare_224(args, cores),
                      "process_cpus_by_cores": {str(cores[0]): available},
                      "device": peak.machine(), "tf_version": tf.__version__,
                      "settings": ap.settings(args, exp), "env": common.environment(),
                      "load_average": peak.load_average(),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return
  load_before = peak.load_average()

  from nnclr_tf import data

  src = subset_source(image_dir, args.images, exp.train.seed)
  results = {}
  for mode in args.modes.split(","):
    t = time.perf_counter()
    s = data.cache_decoded(src, size, 1 << 30) if mode == "cached" else src
    prep = time.perf_counter() - t
    key = f"{size}px_{mode}"
    results[key] = {"image_size": size, "augment": args.augment, "images": len(s),
                    "batch_size": batch, "decode_once_s": prep if mode == "cached"
                    else 0.0, "pairs_per_sec_by_cores": {}}
    for c in cores:
      results[key]["pairs_per_sec_by_cores"][str(c)] = pairs_per_sec(
          s, augment_config(args.augment), size, batch, c, args.warmup_batches, args.batches,
          exp.train.seed)
  if args.large_size:
    t = time.perf_counter()
    large = make_large_jpegs(subset_source(image_dir, args.large_images, exp.train.seed),
                             args.large_dir, args.large_size)
    made = time.perf_counter() - t
    s = data.folder_source(large)
    key = f"{args.large_size}px_files"
    results[key] = {"image_size": args.large_size, "augment": args.large_augment,
                    "images": len(s), "batch_size": args.large_batch_size, "dir": large,
                    "make_s": made, "pairs_per_sec_by_cores": {},
                    "decode_only_pairs_per_sec_by_cores": {}, "full_over_decode_only": {}}
    full = augment_config(args.large_augment)
    for c in cores:
      # Back to back per core count, so the ratio holds even when the machine's speed drifts.
      rates = [pairs_per_sec(s, a, args.large_size, args.large_batch_size, c,
                             args.warmup_batches, args.batches, exp.train.seed)
               for a in (full, decode_only(full))]
      results[key]["pairs_per_sec_by_cores"][str(c)] = rates[0]
      results[key]["decode_only_pairs_per_sec_by_cores"][str(c)] = rates[1]
      results[key]["full_over_decode_only"][str(c)] = rates[0] / rates[1]
    if args.stage_profile:
      results[key]["stage_ms_per_pair"] = stage_profile(s, full, args)
  print(json.dumps({
      "benchmark": "input_pipeline", "results": results, "cores": cores,
      "process_cpus_by_cores": {str(cores[0]): available}, "device": peak.machine(),
      "tf_version": tf.__version__, "settings": ap.settings(args, exp),
      "env": common.environment(), "peak_rss_mb": common.peak_rss_mb(),
      "load_average_before": load_before, "load_average_after": peak.load_average(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S")}))


if __name__ == "__main__":
  main()
