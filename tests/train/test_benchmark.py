"""``resnet-jax benchmark``: the figures it reports obey their definitions, and --profile feeds
benchmarks/kernel_bandwidth.py."""

import json
import math

import jax

from benchmarks.kernel_bandwidth import report
from resnet_jax.cli import main
from resnet_jax.models import create_model, model_macs


def test_benchmark_reports_consistent_figures_and_a_profile_kernel_bandwidth_can_read(tmp_path, capsys):
    profile = tmp_path / "profile"
    rc = main(["benchmark", "--model", "resnet18", "--batch-size", "8", "--image-size", "32", "--dtype", "float32",
               "--steps", "10", "--json", "--profile", str(profile)])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["model"], r["batch_size"], r["image_size"], r["devices"]) == ("resnet18", 8, 32, len(jax.devices()))
    assert r["images_per_second_min"] <= r["images_per_second"] <= r["images_per_second_max"]
    assert math.isclose(r["step_ms"], 1000 * 8 / r["images_per_second"])
    # issue 6's definition: 3 x 2 x multiply-adds per image (model_macs is checked against torchvision)
    macs = model_macs(create_model("resnet18"), 32)
    assert math.isclose(r["model_tflops"], 6 * macs * r["images_per_second"] / 1e12)
    assert r["compile_seconds"] > 0
    # the step keeps at least its inputs: the float32 parameters and momentum, and the batch
    params = 11_689_512  # torchvision's resnet18 (1000 classes)
    assert r["compiled_memory_gib"] * 2**30 > 2 * 4 * params + 8 * 32 * 32 * 3 * 4
    assert len(r["losses"]) == 5 + 10 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0]  # one fixed batch, lr warm-up: the step learns it

    k = report(str(profile))  # the last of 5 windows of 10 // 5 steps
    assert k["steps"] == 2 and k["unmatched_ms"] == 0 and k["device_busy_ms"] > 0


def test_steps_per_dispatch_times_the_same_training_as_single_steps():
    """Three steps per call (``jax.lax.scan``) give the single-step loss curve on the same
    seed (float32), and whole calls are timed: 2 windows of 3 steps."""
    from resnet_jax.train.benchmark import measure
    from tests.conftest import tiny_config

    config = tiny_config(**{"schedule.name": "constant"})  # 4 distinct fake batches; both time the first
    single = measure(config, steps=6, windows=2, warmup=2)
    scanned = measure(config, steps=6, windows=2, warmup=2, steps_per_dispatch=3)
    assert (single["steps_per_dispatch"], scanned["steps_per_dispatch"]) == (1, 3)
    assert single["steps"] == scanned["steps"] == 6
    assert (len(single["losses"]), len(scanned["losses"])) == (2 + 6, 3 + 6)  # warm-up: one call of 3
    assert max(abs(a - b) for a, b in zip(single["losses"], scanned["losses"])) <= 1e-4
    assert single["losses"][-1] < single["losses"][0]
