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


def test_largest_fitting_brackets_a_known_threshold():
    """Against a closed-form memory limit (batches up to T fit): doubling from the start,
    then bisection in multiples of 8 to within 1/16 of the answer."""
    from resnet_jax.train.benchmark import largest_fitting

    probes = []

    def fits(batch):
        probes.append(batch)
        return batch <= 900

    assert largest_fitting(fits, start=64, limit=8192) == (896, 928)
    assert probes == [64, 128, 256, 512, 1024, 768, 896, 960, 928]
    for threshold in (8, 9, 63, 64, 65, 100, 257, 1000, 1500, 4095):
        for start in (8, 64, 256):
            fitted, failed = largest_fitting(lambda b, t=threshold: b <= t, start=start, limit=8192)
            assert fitted <= threshold < failed and fitted % 8 == 0 and failed % 8 == 0
            assert failed - fitted <= max(8, fitted // 16)
    # every batch up to the limit fits: the search says where it stopped
    assert largest_fitting(lambda b: True, start=64, limit=1000) == (1000, None)
    # the start itself does not fit: bisects downwards; nothing fits: 0
    assert largest_fitting(lambda b: b <= 40, start=256, limit=8192) == (40, 48)
    assert largest_fitting(lambda b: False, start=64, limit=8192) == (0, 8)


def test_find_max_batch_is_refused_before_any_timing_where_there_is_no_memory_limit(monkeypatch):
    """On the CPU there is no device memory limit, and running out of host memory kills the
    process: the flag is refused at once, naming the problem and the way out."""
    import pytest

    from resnet_jax.train import benchmark

    if benchmark.device_memory_limit_bytes() is not None:
        pytest.skip("this backend reports a memory limit")

    def must_not_run(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(benchmark, "measure", must_not_run)
    with pytest.raises(SystemExit, match="--find-max-batch needs a device that reports its memory limit"):
        main(["benchmark", "--model", "resnet18", "--batch-size", "8", "--image-size", "32", "--find-max-batch"])


def test_find_max_batch_stops_at_the_device_memory_limit_without_running_what_does_not_fit(monkeypatch):
    """With a memory limit just above the compiled batch-16 step, the search finds 16 and
    sees 24 fail; batches over the limit are refused from their buffer assignment, unrun."""
    from resnet_jax.train import benchmark

    model, size = "resnet20", 8  # CIFAR ResNet-20 (1000 classes here): compiles in seconds
    needed_16 = benchmark.measure(benchmark.benchmark_config(model, 16, size, "float32"), steps=1, windows=1,
                                  warmup=1)["compiled_memory_gib"] * 2**30
    monkeypatch.setattr(benchmark, "device_memory_limit_bytes", lambda: int(needed_16) + 1)
    log = []
    found = benchmark.find_max_batch(model, size, "float32", start=16, log=log.append)
    assert (found["max_batch"], found["max_batch_fails"]) == (16, 24)
    assert math.isclose(found["memory_limit_gib"] * 2**30, int(needed_16) + 1)
    probes = {int(line.split()[1].rstrip(":")): line for line in log[1:]}
    assert list(probes) == [16, 32, 24]
    assert "fits (" in probes[16]
    assert all("does not fit (the compiled step needs" in probes[b] for b in (32, 24))
