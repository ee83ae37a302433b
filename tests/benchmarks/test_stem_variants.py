"""The stem candidates in ``benchmarks/stem_variants.py`` compute the model's functions.

Each is checked against an independent reference: the convolutions and their weight
gradients against torch's ``conv2d`` under autograd (float32, 7x7/2, padding 3, as
torchvision's ResNet ``conv1``), the parity max pool against flax's ``nn.max_pool``
(XLA's reduce-window and select-and-scatter), values and both derivatives, ties included.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import stem_variants


@pytest.mark.parametrize("size", [(16, 16), (15, 17), (1, 2)])
@pytest.mark.parametrize("variant", sorted(stem_variants.CONV_VARIANTS))
def test_stem_convolutions_and_weight_gradients_equal_torch_conv2d(variant, size):
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


def test_space_to_depth_refuses_other_kernels():
    with pytest.raises(ValueError, match="7x7"):
        stem_variants.conv_space_to_depth(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (1, 1, 1, 1), (2, 12, 10, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_parity_max_pool_values_and_derivatives_equal_flax_max_pool(shape, dtype):
    """Bit for bit, as change 3's kernel is tested: inputs with ties (whole windows at 0 after
    a ReLU, and equal nonzero values), where the derivative must go to each window's first
    maximum in row-major order."""

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    pool = stem_variants.max_pool_parity
    x = jax.random.normal(jax.random.key(0), shape)
    x = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, shape), 0.0, x)
    x = (jnp.round(x * 2) / 2).astype(dtype)
    y_ref, pullback_ref = jax.vjp(reference, x)
    y, pullback = jax.vjp(pool, x)
    chex.assert_trees_all_equal(y, y_ref)
    cotangent = jax.random.normal(jax.random.key(2), y.shape, dtype)
    chex.assert_trees_all_equal(pullback(cotangent), pullback_ref(cotangent))
    tangent = jax.random.normal(jax.random.key(3), shape, dtype)
    chex.assert_trees_all_equal(jax.jvp(pool, (x,), (tangent,)), jax.jvp(reference, (x,), (tangent,)))


def test_the_benchmark_runs_and_every_candidate_agrees(capsys):
    """The device job's path on CPU at a tiny size: one JSON row per candidate, each within
    bf16 rounding of the first candidate of its part (relative to that part's largest value)."""
    rows = stem_variants.run(batch=2, image=20, width=8, dtype_name="bfloat16",
                             conv_variants=list(stem_variants.CONV_VARIANTS),
                             pool_variants=list(stem_variants.POOL_VARIANTS), warmup=1, repeats=1, inner=1)
    assert [(r["part"], r["variant"]) for r in rows] == (
        [("stem_conv", v) for v in stem_variants.CONV_VARIANTS]
        + [("bn_max_pool_relu", v) for v in stem_variants.POOL_VARIANTS])
    for r in rows:
        assert r["ms"] > 0 and r["vs_current"] > 0
        assert r["max_rel_diff_vs_first"] < 2e-2, r
    assert capsys.readouterr().out.count('"part"') == len(rows)
