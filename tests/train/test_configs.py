"""Recipes: every config and variant loads and resolves; smoke variants train; the values
equal the published ones (the expected numbers here come from the papers and the
official configs, not from our code)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from resnet_jax.models import model_params
from resnet_jax.train.loop import build_model, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGENET_VARIANTS = [f"resnet{d}{k}{r}" for d in (18, 34, 50, 101, 152, 200) for k in ("", "_v1", "d")
                     for r in ("", "-paper", "-modern")]
CIFAR_VARIANTS = [f"{f}{d}" for f in ("resnet", "plain") for d in (20, 32, 44, 56, 110)]
RS = load("resnet_rs")
RS_VARIANTS = list(RS.PUBLISHED) + ["scaled-152-288"]


@pytest.mark.parametrize(
    "module,variant",
    [("imagenet_resnet", v) for v in IMAGENET_VARIANTS] + [("cifar_resnet", v) for v in CIFAR_VARIANTS]
    + [("resnet_rs", v) for v in RS_VARIANTS] + [("digits", None), ("digits", "plain20")],
)
def test_every_variant_resolves_to_a_buildable_model(module, variant):
    config = load(module).get_config(variant)
    model = build_model(config, num_classes=config.data.num_classes)
    assert model_params(model, 32) > 0
    config.lock()
    assert config.data.batch_size % 8 == 0 or config.data.name == "digits"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["imagenet_resnet", "cifar_resnet", "resnet_rs", "digits"])
def test_smoke_variant_trains_two_steps_on_a_cpu(module, tmp_path):
    config = load(module).get_config("smoke")
    config.compilation_cache_dir = ""
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "finished" and summary["step"] == 2
    assert summary["eval"]["examples"] == (359 if module == "digits" else config.data.fake_eval_size)


def test_unknown_variants_are_refused():
    for module, bad in (("imagenet_resnet", "resnet51"), ("cifar_resnet", "resnet21"), ("resnet_rs", "rs50-224")):
        with pytest.raises(ValueError, match="unknown variant"):
            load(module).get_config(bad)


def test_imagenet_paper_recipe_is_the_papers():
    """He et al. 2015, section 3.4."""
    c = load("imagenet_resnet").get_config("resnet50")
    assert (c.data.batch_size, c.optimizer.base_lr, c.optimizer.momentum, c.optimizer.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert (c.schedule.name, c.schedule.step_epochs, c.schedule.decay_factor, c.num_epochs) == ("step", 30, 0.1, 90)
    assert (c.data.image_size, c.data.preprocess, c.data.flip, c.data.crop_fraction) == (224, "imagenet", True, 0.875)
    v1 = build_model(load("imagenet_resnet").get_config("resnet50_v1"), 1000)
    assert v1.stride_on_1x1 and not build_model(c, 1000).stride_on_1x1
    assert build_model(load("imagenet_resnet").get_config("resnet50d"), 1000).shortcut == "avg_down"
    m = load("imagenet_resnet").get_config("resnet50-modern")
    assert (m.num_epochs, m.schedule.name, m.schedule.warmup_epochs, m.label_smoothing, m.model.dtype) == (
        100, "cosine", 5, 0.1, "bfloat16")
    assert m.optimizer.scale_lr_with_batch and 1024 <= m.data.batch_size <= 4096


def test_cifar_recipe_is_the_papers():
    """He et al. 2015, section 4.2."""
    c = load("cifar_resnet").get_config("resnet56")
    assert (c.data.batch_size, c.optimizer.base_lr, c.optimizer.weight_decay, c.optimizer.momentum) == (128, 0.1, 1e-4, 0.9)
    assert tuple(c.schedule.boundaries) == (32000, 48000) and c.num_train_steps == 64000
    assert (c.data.cifar_pad, c.data.flip, c.data.image_size) == (4, True, 32)
    assert build_model(c, 10).shortcut == "zero_pad"
    assert build_model(load("cifar_resnet").get_config("plain56"), 10).shortcut == "none"
    r110 = load("cifar_resnet").get_config("resnet110")
    assert r110.schedule.initial_lr_factor * r110.optimizer.base_lr == pytest.approx(0.01)
    assert r110.schedule.initial_lr_until_step == 400


# tensorflow/tpu models/official/resnet/resnet_rs/configs/resnetrs{depth}_i{size}.yaml:
# (dropout_rate, drop_connect_rate, randaug_magnitude, image_size); top-1 from its README.
PUBLISHED_RS = {
    "rs50-160": (0.25, 0.0, 10, 160, 78.8),
    "rs101-160": (0.25, 0.0, 10, 160, 80.3),
    "rs101-192": (0.25, 0.0, 15, 192, 81.2),
    "rs152-192": (0.25, 0.0, 15, 192, 82.0),
    "rs152-224": (0.25, 0.0, 15, 224, 82.2),
    "rs152-256": (0.25, 0.0, 15, 256, 83.0),
    "rs200-256": (0.25, 0.1, 15, 256, 83.4),
    "rs270-256": (0.25, 0.1, 15, 256, 83.8),
    "rs350-256": (0.25, 0.1, 15, 256, 84.0),
    "rs350-320": (0.4, 0.1, 15, 320, 84.2),
    "rs420-320": (0.4, 0.1, 15, 320, 84.4),
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_RS))
def test_resnet_rs_values_equal_the_published_configs(variant):
    dropout, depth_rate, magnitude, size, top1 = PUBLISHED_RS[variant]
    c = RS.get_config(variant)
    assert (c.model.dropout_rate, c.model.drop_path_rate, c.data.randaugment_magnitude, c.data.image_size) == (
        dropout, depth_rate, magnitude, size)
    assert c.data.randaugment_layers == 2
    # Shared recipe: 350 epochs, batch 4096, lr 0.1 x 4096/256 = 1.6, wd 4e-5, LS 0.1, EMA 0.9999.
    assert (c.num_epochs, c.data.batch_size, c.optimizer.weight_decay, c.label_smoothing, c.ema_decay) == (
        350, 4096, 4e-5, 0.1, 0.9999)
    assert c.optimizer.base_lr * c.data.batch_size / 256 == pytest.approx(1.6)
    assert c.schedule.name == "cosine" and c.model.dtype == "bfloat16"
    model = build_model(c, 1000)
    assert (model.se_ratio, model.stem, model.shortcut, model.stem_pool) == (0.25, "deep", "avg_down", "conv")
    assert f"| {variant.ljust(10)} |" in RS.__doc__ and f"| {top1}" in RS.__doc__


def test_resnet_rs_budget_picks_the_largest_fitting_model():
    assert RS.config_for_budget(3.0) == "rs50-160"  # rs50@160 ~2.3 GFLOPs, rs101@160 ~4.3
    with pytest.raises(ValueError, match="no ResNet-RS fits"):
        RS.config_for_budget(1.0)


@pytest.mark.slow
def test_degradation_experiment_writes_png_and_csv(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", "experiment", "degradation", "--epochs", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    png = (tmp_path / "degradation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = (tmp_path / "degradation.csv").read_text().splitlines()
    assert rows[0] == "model,epoch,train_error,test_error"
    assert {r.split(",")[0] for r in rows[1:]} == {"plain20", "plain56", "resnet20", "resnet56"}
    assert all(0 <= float(r.split(",")[3]) <= 1 for r in rows[1:])
