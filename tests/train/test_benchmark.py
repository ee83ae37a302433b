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
    assert len(r["losses"]) == 5 + 10 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0]  # one fixed batch, lr warm-up: the step learns it

    k = report(str(profile))  # the last of 5 windows of 10 // 5 steps
    assert k["steps"] == 2 and k["unmatched_ms"] == 0 and k["device_busy_ms"] > 0
