"""The stem candidates in ``benchmarks/stem_variants.py`` compute the model's functions.

Each is checked against an independent reference: the convolutions and their weight
gradients against torch's ``conv2d`` under autograd (float32, 7x7/2, padding 3, as
torchvision's ResNet ``conv1``). The max pools (strided slices, parity planes, and parity
planes with the hand-written reverse pass) are checked bit for bit against flax's
``nn.max_pool`` in tests/models/test_modules.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import stem_variants


@pytest.mark.parametrize("size", [(16, 16), (15, 17), (1, 2)])
@pytest.mark.parametrize("variant", ["pad4", "pad8"])
def test_padded_stem_convolutions_and_weight_gradients_equal_torch_conv2d(variant, size):
    """The benchmark's own candidates (the model's, direct and space to depth, are checked in
    tests/models/test_modules.py)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    kernel = rng.normal(size=(7, 7, 3, 5)).astype(np.float32)
    impl = stem_variants.CONV_VARIANTS[variant]
    y, pullback = jax.vjp(lambda k: impl(jnp.asarray(x), k), jnp.asarray(kernel))
    cotangent = rng.normal(size=y.shape).astype(np.float32)
    (dkernel,) = pullback(jnp.asarray(cotangent))

    x_t = torch.tensor(x).permute(0, 3, 1, 2)
    k_t = torch.tensor(kernel).permute(3, 2, 0, 1).requires_grad_()
    y_t = torch.nn.functional.conv2d(x_t, k_t, stride=2, padding=3)
    y_t.backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(y), y_t.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dkernel), k_t.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-4, atol=1e-4)


def test_the_benchmark_runs_and_every_candidate_agrees(capsys):
    """The device job's path on CPU at a tiny size: one JSON row per candidate, each within
    bf16 rounding of the first candidate of its part (relative to that part's largest value)."""
    rows = stem_variants.run(batch=2, image=20, width=16, dtype_name="bfloat16",
                             conv_variants=list(stem_variants.CONV_VARIANTS),
                             pool_variants=list(stem_variants.POOL_VARIANTS), warmup=1, repeats=1, inner=1)
    assert [(r["part"], r["variant"]) for r in rows] == (
        [("stem_conv", v) for v in stem_variants.CONV_VARIANTS]
        + [("bn_max_pool_relu", v) for v in stem_variants.POOL_VARIANTS]
        + [("bn_pool_relu_train", v) for v in stem_variants.TRAIN_VARIANTS])
    for r in rows:
        assert r["ms"] > 0 and r["vs_current"] > 0
        assert r["max_rel_diff_vs_first"] < 2e-2, r
    assert capsys.readouterr().out.count('"part"') == len(rows)


@pytest.mark.slow
def test_each_gpu_choice_undone_in_the_model_trains_as_the_model_does():
    """The whole-step comparison runs the real model as it is, with the candidate pool, then
    with each of its GPU choices undone, then with all three (off a GPU the model's own kernels are XLA's, so the
    patches change the CPU step only where they name a kernel): in float32 the losses of 5
    steps match the model's own to rounding, and the patches are undone afterwards."""
    from resnet_jax.models import layers

    before = layers.conv_7x7_s2, layers.max_pool_3x3_s2, layers._batch_norm_train
    rows = stem_variants.full_steps("resnet18", batch=8, image=32, dtype_name="float32", steps=5)
    assert [(r["conv"], r["pool"], r["bn_relu"]) for r in rows] == [
        ("model's", "model's", "model"), ("model's", "planes", "model"), ("direct", "model's", "model"),
        ("model's", "slices", "model"), ("model's", "model's", "xla"), ("direct", "slices", "xla")]
    assert rows[0]["vs_model"] == 1.0
    # the pools' values and gradients are bit-equal (test_modules), but XLA fuses each step
    # differently, so the float32 losses may differ by rounding (1e-5 with jax 0.10.2)
    assert all(r["max_loss_diff_vs_model"] < 1e-4 for r in rows)
    assert (layers.conv_7x7_s2, layers.max_pool_3x3_s2, layers._batch_norm_train) == before


def test_a_whole_step_variant_that_fails_is_reported_and_the_rest_still_run(monkeypatch, capsys):
    """full_steps: a variant's step that raises gets an error row and the runs after it
    still happen; a failure of the model's own step (nothing to compare with) is raised."""
    import json

    def fake_step(model, batch, image, dtype_name, steps, conv_v, pool_v, bn_v):
        if bn_v == "xla" and conv_v is None:
            raise RuntimeError("XLA refused the step")
        return {"device_kind": "cpu", "images_per_second": 100.0 + len(conv_v or ""), "peak_memory_gib": None,
                "compiled_memory_gib": 1.0, "losses": [2.0, 1.5]}

    monkeypatch.setattr(stem_variants, "full_step", fake_step)
    rows = stem_variants.full_steps("resnet18", 8, 32, "float32", 2)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["bn_relu"] for r in rows] == ["model"] * 4 + ["xla"]
    failed = [r for r in printed if "error" in r]
    assert len(printed) == 6 and [(r["conv"], r["bn_relu"]) for r in failed] == [("model's", "xla")]
    assert "XLA refused" in failed[0]["error"]

    def broken(*args):
        raise RuntimeError("no device")

    monkeypatch.setattr(stem_variants, "full_step", broken)
    with pytest.raises(RuntimeError, match="no device"):
        stem_variants.full_steps("resnet18", 8, 32, "float32", 2)
