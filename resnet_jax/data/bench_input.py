"""``resnet-jax bench-input``: images/s of the ImageNet preprocessing on realistic JPEGs.

Writes (once, cached) an image folder of synthetic photographs-like JPEGs (smooth
random fields plus texture, 500x375, quality 90: about the size and entropy of an
ImageNet JPEG), prepares it as a tfds dataset, then runs this process's real
tf.data train pipeline (fused decode-and-random-crop, flip, resize, normalise,
batch) and the eval pipeline (centre crop) with a private thread pool of N threads,
and reports images/s in total and per thread (= per host core). No accelerator is
involved: this is what one host can feed. The eval path reads the train split's 90%
of the files: the 10% validation split alone would restart the eval iterator every
few batches and time its start-up rather than its preprocessing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


def write_synthetic_jpegs(root: str, num_images: int, width: int = 500, height: int = 375, classes: int = 10) -> None:
    """``root/{train,val}/cNN/*.jpg``: smooth colour fields with fine texture, quality 90."""
    from PIL import Image

    marker = os.path.join(root, f".complete-{num_images}-{width}x{height}")
    if os.path.exists(marker):
        return
    rng = np.random.default_rng(0)
    for i in range(num_images):
        split = "val" if i % 10 == 9 else "train"
        folder = os.path.join(root, split, f"c{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
        texture = rng.normal(0, 12, (height, width, 3))
        image = np.clip(field + texture, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()


def _measure(iterator, batch: int, seconds: float, warmup_batches: int = 3) -> float:
    for _ in range(warmup_batches):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch
    return count / (time.perf_counter() - start)


def run(
    num_images: int = 2000,
    threads: tuple[int, ...] = (1, 2),
    seconds: float = 15.0,
    image_size: int = 224,
    batch: int = 64,
    cache_dir: str = "~/.cache/resnet_jax/bench_input",
    randaugment_layers: int = 0,
    randaugment_magnitude: float = 10.0,
) -> list[dict[str, Any]]:
    """Measures train and eval preprocessing throughput for each thread count.

    ``randaugment_layers`` > 0 adds RandAugment to the train path, as the ResNet-RS
    recipes train (2 layers, magnitude 10 or 15).
    """
    from resnet_jax.data.pipeline import create_pipeline
    from resnet_jax.train.config import base_config

    cache_dir = os.path.expanduser(cache_dir)
    folder = os.path.join(cache_dir, "images")
    print(f"writing {num_images} synthetic 500x375 JPEGs (q90) to {folder} (cached) ...", flush=True)
    write_synthetic_jpegs(folder, num_images)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg")]
    print(f"{len(sizes)} files, mean {np.mean(sizes) / 1024:.0f} KiB", flush=True)
    if randaugment_layers:
        print(f"train path with RandAugment: {randaugment_layers} layers, magnitude {randaugment_magnitude:g}", flush=True)
    results = []
    for n in threads:
        cfg = base_config().data
        cfg.name = f"image_folder:{folder}"
        cfg.data_dir = os.path.join(cache_dir, "tfds")
        cfg.eval_split = "train"  # many batches per pass (see the module docstring)
        cfg.image_size = image_size
        cfg.batch_size = cfg.eval_batch_size = batch
        cfg.threads = n
        cfg.randaugment_layers = randaugment_layers
        cfg.randaugment_magnitude = randaugment_magnitude
        cfg.shuffle_buffer = 1024
        pipeline = create_pipeline(cfg, seed=0, process_index=0, process_count=1, device_count=1)
        train = _measure(pipeline.train_batches(0), batch, seconds)

        def eval_forever():
            while True:
                yield from pipeline.eval_batches()

        evaluation = _measure(eval_forever(), batch, seconds)
        row = {
            "threads": n, "train_images_per_s": train, "train_per_core": train / n,
            "eval_images_per_s": evaluation, "eval_per_core": evaluation / n,
            "image_size": image_size, "host_cores": os.cpu_count(),
            "randaugment_layers": randaugment_layers, "randaugment_magnitude": randaugment_magnitude,
        }
        results.append(row)
        print(
            f"threads {n}: train {train:7.1f} img/s ({train / n:6.1f}/core) | "
            f"eval {evaluation:7.1f} img/s ({evaluation / n:6.1f}/core)",
            flush=True,
        )
    return results


def main(args: Any) -> int:
    results = run(
        num_images=args.num_images, threads=tuple(int(t) for t in args.threads.split(",")),
        seconds=args.seconds, image_size=args.image_size, batch=args.batch_size,
        randaugment_layers=args.randaugment_layers, randaugment_magnitude=args.randaugment_magnitude,
    )
    if args.json:
        print(json.dumps(results))
    return 0
