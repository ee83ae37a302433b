"""``resnet-jax benchmark``: the figures it reports obey their definitions, and --profile feeds
benchmarks/kernel_bandwidth.py."""

import json
import math
import os

import jax
import pytest

from benchmarks.kernel_bandwidth import report
from resnet_jax.cli import main
from resnet_jax.models import create_model, model_macs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


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


@pytest.mark.parametrize("overhead", [1.0, 1.03, 1.15])
def test_a_memory_guided_search_needs_few_probes_and_still_brackets_the_limit(overhead):
    """Closed-form device: a step of batch b compiles to 0.26 GiB + 39.1 MiB x b (ResNet-50 in
    bf16, as compiled for the H100) and runs if ``overhead`` times that is within the 104.85
    GiB XLA may allocate on an H200. The guess extrapolates the compiled bytes, so it is right
    when the run needs no more than compiled (overhead 1.0, within the guess's 2% margin) and
    too high when it needs 3% or 15% more: the answer is bracketed as precisely as doubling and
    bisection bracket it, in four probes for a right guess and never more than the unguided
    search's."""
    from resnet_jax.train.benchmark import largest_fitting, linear_memory_guess

    limit, gib = 104.85 * 2**30, 2**30
    compiled = lambda b: 0.26 * gib + 39.1 * 2**20 * b  # noqa: E731
    truth = max(b for b in range(8, 8193, 8) if overhead * compiled(b) <= limit)

    def search(guided):
        seen, probes = {}, []

        def fits(b):
            probes.append(b)
            ok = overhead * compiled(b) <= limit
            if ok:
                seen[b] = compiled(b)
            return ok

        guess = (lambda: linear_memory_guess(seen, limit)) if guided else None
        return largest_fitting(fits, start=256, limit=8192, guess=guess), probes

    (fitted, failed), probes = search(guided=True)
    assert fitted <= truth < failed and fitted % 8 == 0 and failed % 8 == 0
    assert failed - fitted <= max(8, fitted // 16)
    _, unguided = search(guided=False)
    assert len(probes) <= len(unguided)
    if overhead == 1.0:  # 256; the guess through the origin; the guess on the line; one step above it
        assert len(probes) <= 4, probes
    print(f"overhead {overhead}: guided {probes}, unguided {unguided}")


def test_linear_memory_guess_extrapolates_the_line_through_the_two_largest_batches():
    from resnet_jax.train.benchmark import linear_memory_guess

    assert linear_memory_guess({}, 100.0) is None
    # through the origin from one point: 10 bytes per image, 98 bytes usable
    assert linear_memory_guess({8: 80.0}, 100.0) == 9
    # 2 bytes per image plus 20 fixed: (98 - 20) / 2; a smaller third point is ignored
    assert linear_memory_guess({4: 999.0, 10: 40.0, 20: 60.0}, 100.0) == 39
    assert linear_memory_guess({10: 40.0, 20: 60.0}, 100.0, margin=0.0) == 40


def test_find_max_batch_is_refused_before_any_timing_where_there_is_no_memory_limit(monkeypatch):
    """On the CPU there is no device memory limit, and running out of host memory kills the
    process: the flag is refused at once, naming the problem and the way out."""
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
    # the guess from batch 16's compiled bytes is below 24: one step up, not a doubling
    assert list(probes) == found["max_batch_probes"] == [16, 24]
    assert "fits (" in probes[16]
    assert "does not fit (the compiled step needs" in probes[24]
    # a batch the benchmark has just measured is not compiled again
    log.clear()
    found = benchmark.find_max_batch(model, size, "float32", start=16, log=log.append, measured={16: needed_16})
    assert (found["max_batch"], found["max_batch_fails"], found["max_batch_probes"]) == (16, 24, [24])
    assert "measured above" in log[1]


def test_benchmark_times_a_recipes_own_step_ema_included(capsys):
    """``--config FILE.py[:variant]`` times that recipe's step on synthetic data: its model,
    image size and dtype, and its training options (ResNet-RS: EMA, label smoothing, weight
    decay without BatchNorm, dropout). With EMA on, the compiled step holds one more float32
    copy of every parameter."""
    from resnet_jax.models import create_model
    from resnet_jax.models.complexity import abstract_variables, count_params
    from resnet_jax.train.benchmark import benchmark_config, measure
    from resnet_jax.train.config import load_recipe

    rs50 = load_recipe(os.path.join(CONFIGS, "resnet_rs.py:rs50-160"))
    config = benchmark_config("resnetrs50", 8, 160, "bfloat16", recipe=rs50)
    assert (config.ema_decay, config.label_smoothing, config.optimizer.weight_decay) == (0.9999, 0.1, 4e-5)
    assert not config.optimizer.decay_bn_and_bias and config.model.dropout_rate == 0.25
    assert (config.data.name, config.data.image_size, config.data.batch_size) == ("fake", 160, 8)

    digits = os.path.join(CONFIGS, "digits.py")
    rc = main(["benchmark", "--config", digits, "--batch-size", "8", "--steps", "5", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recipe = load_recipe(digits)
    assert (r["model"], r["image_size"], r["dtype"], r["config"]) == (
        recipe.model.name, recipe.data.image_size, recipe.model.dtype, digits)
    recipe.ema_decay = 0.999
    with_ema = measure(benchmark_config(recipe.model.name, 8, recipe.data.image_size, recipe.model.dtype,
                                        recipe=recipe), steps=1, windows=1, warmup=1)
    # the EMA copy: 4 bytes per parameter and per BatchNorm statistic of the 1000-class model (+ alignment)
    variables = abstract_variables(create_model(recipe.model.name, num_classes=1000), recipe.data.image_size)
    ema_bytes = 4 * (count_params(variables["params"]) + count_params(variables["batch_stats"]))
    extra_bytes = (with_ema["compiled_memory_gib"] - r["compiled_memory_gib"]) * 2**30
    assert ema_bytes <= extra_bytes <= 1.01 * ema_bytes


def test_benchmark_names_a_missing_recipe_file():
    with pytest.raises(SystemExit, match="no recipe file 'configs/nope.py'"):
        main(["benchmark", "--config", "configs/nope.py:x", "--steps", "1"])


def test_with_input_feeds_the_step_from_the_recipes_own_dataset(capsys):
    """``--with-input --config configs/digits.py`` trains on the embedded digits through
    tf.data: the model gets the dataset's 10 classes, so the first loss is near ln 10 = 2.3
    (measured 2.7), not near the ln 1000 = 6.9 of the 1000 synthetic classes."""
    pytest.importorskip("tensorflow")
    rc = main(["benchmark", "--config", os.path.join(CONFIGS, "digits.py"), "--with-input", "--batch-size", "32",
               "--steps", "5", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["with_input"], r["dataset"], r["model"], r["image_size"]) == (True, "digits", "resnet20", 8)
    assert abs(r["losses"][0] - math.log(10)) < 1.5 and r["images_per_second"] > 0
