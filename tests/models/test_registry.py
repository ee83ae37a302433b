"""Registry: parameter counts against torchvision/timm, FLOPs against the paper."""

import subprocess
import sys

import pytest

from resnet_jax.models import create_model, get_spec, list_models, model_macs, model_params

# Trainable parameters at 1000 classes, as reported by torchvision 0.26 and timm 1.0.29
# (sum(p.numel() for p in model.parameters())).
PEER_PARAMS = {
    "resnet18": 11_689_512,
    "resnet26": 15_995_176,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet200": 64_673_832,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "resnet18d": 11_708_744,
    "resnet34d": 21_816_904,
    "resnet50d": 25_576_264,
    "resnet101d": 44_568_392,
    "resnet152d": 60_212_040,
    "resnet200d": 64_693_064,
    "seresnet50": 28_088_024,
    "seresnet101": 49_326_872,
    "seresnet152": 66_821_848,
    "seresnext50_32x4d": 27_559_896,
    "resnext50d_32x4d": 25_048_136,
    "resnetrs50": 35_691_912,
    "resnetrs101": 63_618_696,
    "resnetrs152": 86_621_576,
    "resnetrs200": 93_209_992,
    "resnetrs270": 129_861_448,
    "resnetrs350": 163_956_168,
    "resnetrs420": 191_891_656,
}


@pytest.mark.parametrize("name", sorted(PEER_PARAMS))
def test_param_count_equals_peer(name):
    assert model_params(create_model(name), image_size=32) == PEER_PARAMS[name]


# He et al. 2015, Table 6: "0.27M / 0.46M / 0.66M / 0.85M / 1.7M" parameters.
PAPER_CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize("depth", sorted(PAPER_CIFAR_PARAMS_M))
def test_cifar_param_count_matches_paper(depth):
    resnet = model_params(create_model(f"resnet{depth}"), image_size=32)
    plain = model_params(create_model(f"plain{depth}"), image_size=32)
    # Option A shortcuts add no parameters, so plain and residual nets are equal.
    assert resnet == plain
    assert resnet / 1e6 == pytest.approx(PAPER_CIFAR_PARAMS_M[depth], abs=0.01 if depth < 110 else 0.05)
    # 6n + 2 weighted layers: 1 stem conv + 6n block convs + 1 fc.
    n = (depth - 2) // 6
    assert get_spec(f"resnet{depth}").kwargs["stage_sizes"] == (n, n, n)


# He et al. 2015, Table 1 (v1: stride on the first 1x1), in 1e9 multiply-adds, quoted to
# one decimal; torchvision's v1.5 ResNet-50 (stride on the 3x3) is 4.1e9.
PAPER_GFLOPS_V1 = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS_V1))
def test_flops_match_paper_table1(name):
    macs = model_macs(create_model(name, stride_on_1x1=True), 224) / 1e9
    assert abs(macs - PAPER_GFLOPS_V1[name]) <= 0.07


def test_flops_v15_resnet50():
    assert model_macs(create_model("resnet50"), 224) / 1e9 == pytest.approx(4.1, abs=0.02)


def test_every_registered_model_builds_and_has_metadata():
    names = list_models()
    assert len(names) == len(set(names)) >= 40
    for name in names:
        spec = get_spec(name)
        assert spec.input_size in (32, 160, 192, 224, 256, 288, 320)
        assert 0 < spec.crop_pct <= 1
        assert len(spec.mean) == len(spec.std) == 3


def test_list_models_filter():
    assert list_models("resnetrs*") == [f"resnetrs{d}" for d in (50, 101, 152, 200, 270, 350, 420)]
    assert list_models("plain*") == [f"plain{d}" for d in (20, 32, 44, 56, 110)]


def test_unknown_model_and_argument_errors_name_the_problem():
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet05")
    with pytest.raises(TypeError, match="num_clases"):
        create_model("resnet18", num_clases=10)


def test_models_import_pulls_no_tensorflow_orbax_or_torch():
    code = (
        "import sys, resnet_jax, resnet_jax.models;"
        "bad = [m for m in ('tensorflow', 'orbax', 'torch', 'tensorflow_datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_models_table():
    out = subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", "models", "--filter", "resnet50*"],
        check=True, capture_output=True, text=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("resnet50 "))
    fields = row.split()
    assert fields[1] == "25.56" and fields[2] == "4.09" and fields[3] == "224"
    assert "resnet50d" in out and "resnet18" not in out
