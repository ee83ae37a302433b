"""Datasets and pipelines: the embedded digits, per-process shares, padding, resume, fake."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax.data import create_pipeline
from resnet_jax.data.pipeline import check_batch_sizes
from resnet_jax.train.config import base_config


def digits_config(tmp_path=None, **changes):
    c = base_config().data
    c.name = "digits"
    c.preprocess = "plain"
    c.image_size = 8
    c.flip = False
    c.mean, c.std = (0.0,), (1 / 255,)  # identity normalisation: pixel values pass through
    c.batch_size = 64
    c.eval_batch_size = 50
    c.cache_train = c.cache_eval = True
    for k, v in changes.items():
        c[k] = v
    return c


def _key(image):
    return hashlib.sha1(np.asarray(image, np.float32).round().astype(np.uint8).tobytes()).hexdigest()


def test_digits_is_scikit_learns_digits_with_the_documented_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pipeline = create_pipeline(digits_config(), seed=0, process_index=0, process_count=1, device_count=1)
    assert (pipeline.info.num_train, pipeline.info.num_eval, pipeline.info.num_classes) == (1438, 359, 10)
    images, labels = [], []
    for batch in pipeline.eval_batches():
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch["label"][real])
    images, labels = np.concatenate(images), np.concatenate(labels)
    test = np.arange(1797) % 5 == 4
    expected = np.round(digits.images[test] * 255 / 16)
    ours = {_key(i): int(lab) for i, lab in zip(images[..., 0], labels)}
    ref = {_key(i): int(lab) for i, lab in zip(expected, digits.target[test])}
    assert ours == ref


def test_process_shares_are_disjoint_and_eval_covers_every_example_once():
    cfg = digits_config(batch_size=63, eval_batch_size=63)
    pipes = [create_pipeline(cfg, seed=3, process_index=i, process_count=3, device_count=3) for i in range(3)]
    # Train: equal, disjoint shares of one epoch (1438 // 3 = 479 each; 1 example left out).
    seen = []
    for p in pipes:
        assert p.train_examples_per_process == 479 and p.local_batch_size == 21
        it = p.train_batches(0)
        batches = [next(it) for _ in range(479 // 21)]
        seen.append({_key(im) + str(lab) for b in batches for im, lab in zip(b["image"], b["label"])})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # Eval: 359 = 120 + 120 + 119; every process yields the same number of batches.
    counts, keys = [], []
    for p in pipes:
        batches = list(p.eval_batches())
        assert len(batches) == p.num_eval_batches == 6  # ceil(120 / 21)
        counts.append(sum(float(b["mask"].sum()) for b in batches))
        keys += [_key(im) for b in batches for im, m in zip(b["image"], b["mask"]) if m]
    assert counts == [120, 120, 119]
    assert len(keys) == 359


def test_same_seed_same_batches_and_resume_skips_exactly():
    cfg = digits_config(preprocess="cifar", cifar_pad=2)  # random crops: augmentation must repeat too
    a = create_pipeline(cfg, seed=7, process_index=0, process_count=1, device_count=1).train_batches(0)
    b = create_pipeline(cfg, seed=7, process_index=0, process_count=1, device_count=1).train_batches(0)
    first = [next(a) for _ in range(30)]  # crosses the epoch boundary (22 batches per epoch)
    for x in first:
        y = next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    resumed = create_pipeline(cfg, seed=7, process_index=0, process_count=1, device_count=1).train_batches(25 * 64)
    for x in first[25:]:
        np.testing.assert_array_equal(x["image"], next(resumed)["image"])
    other = create_pipeline(cfg, seed=8, process_index=0, process_count=1, device_count=1).train_batches(0)
    assert not np.array_equal(first[0]["label"], next(other)["label"])
    # Epochs are reshuffled: epoch 2 is a different order of the same examples.
    assert not np.array_equal(first[0]["label"], first[22]["label"])


def test_batch_sizes_that_cannot_split_fail_before_compilation():
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        check_batch_sizes(100, 64, 1, 8)
    with pytest.raises(ValueError, match="eval_batch_size=60"):
        check_batch_sizes(64, 60, 1, 8)


def test_fake_data_and_training_run_without_tensorflow(tmp_path):
    code = f"""
import sys
sys.modules['tensorflow'] = None  # any import of TensorFlow now fails
sys.path.insert(0, 'tests')
from conftest import tiny_config
from resnet_jax.train.loop import train_and_evaluate
summary = train_and_evaluate(tiny_config(num_train_steps=2), {str(tmp_path)!r})
assert summary['eval']['examples'] == 37, summary
print('ok-without-tf')
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok-without-tf" in run.stdout


def _write_folder(root, layout, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(path, format="PNG" if rel.endswith(".png") else "JPEG", quality=90)


def test_image_folder_prepares_splits_and_reports_corrupt_files(tmp_path, capsys):
    root = tmp_path / "pets"
    files = [f"train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(6)] + ["train/dog/extra.png"]
    files += [f"val/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    _write_folder(root, files)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "val" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    cfg = digits_config(name=f"image_folder:{root}", data_dir=str(tmp_path / "tfds"), preprocess="imagenet",
                        image_size=24, batch_size=4, eval_batch_size=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    p = create_pipeline(cfg, seed=0, process_index=0, process_count=1, device_count=1)
    out = capsys.readouterr().out
    assert "skipped 1 unreadable file" in out and "broken.jpg" in out
    assert (p.info.num_train, p.info.num_eval, p.info.num_classes) == (13, 6, 2)
    assert p.info.class_names == ("cat", "dog")
    batch = next(p.train_batches(0))
    assert batch["image"].shape == (4, 24, 24, 3)
    assert sum(float(b["mask"].sum()) for b in p.eval_batches()) == 6
    cfg.strict_images = True
    cfg.data_dir = str(tmp_path / "tfds_strict")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        create_pipeline(cfg, seed=0, process_index=0, process_count=1, device_count=1)


def test_image_folder_without_splits_uses_a_fixed_fraction(tmp_path):
    from resnet_jax.data.image_folder import scan_folder

    root = tmp_path / "flat"
    _write_folder(root, [f"{c}/{i}.jpg" for c in ("a", "b", "c") for i in range(30)], size=(8, 8))
    splits, classes = scan_folder(str(root), val_fraction=0.2)
    assert classes == ["a", "b", "c"]
    assert len(splits["train"]) + len(splits["val"]) == 90 and 8 <= len(splits["val"]) <= 30
    assert splits == scan_folder(str(root), val_fraction=0.2)[0]  # deterministic
    with pytest.raises(ValueError, match="no images in class sub-folders"):
        scan_folder(str(tmp_path / "flat" / "a"))


def test_bench_input_measures_train_and_eval_throughput(tmp_path):
    from resnet_jax.data import bench_input

    rows = bench_input.run(
        num_images=40, threads=(1,), seconds=0.5, image_size=32, batch=4, cache_dir=str(tmp_path), randaugment_layers=2
    )
    assert len(rows) == 1 and rows[0]["threads"] == 1 and rows[0]["randaugment_layers"] == 2
    assert rows[0]["train_images_per_s"] > 0 and rows[0]["eval_images_per_s"] > 0
