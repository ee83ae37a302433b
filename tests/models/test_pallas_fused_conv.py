"""The fused BatchNorm + ReLU + 1x1 convolution (with or without the BatchNorm after it) and the
1x1 convolution that sums its output's statistics (``pallas_fused_conv``) against the textbook
formula in plain JAX and float64 NumPy, their kernels run under the Pallas interpreter."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.models import pallas_batch_norm, pallas_fused_conv
from resnet_jax.models.pallas_fused_conv import (
    affine_grad, bn_relu_conv1x1, bn_relu_conv1x1_bn, conv1x1_bn, conv1x1_moments, input_grad, matmul_moments,
    weight_grad)
from tests.conftest import require_cuda_plugin

EPS = 1e-5


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that the test shapes run several instances, loop steps and row ranges."""
    for name, value in {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "WGRAD_BLOCK_K": 16, "WGRAD_BLOCK_N": 32,
                        "WGRAD_SUB_ROWS": 16, "WGRAD_PROGRAMS": 16}.items():
        monkeypatch.setattr(pallas_fused_conv, name, value)


def _operands(m, k, n, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = (jax.random.normal(keys[0], (m, k)) + 0.3).astype(dtype)
    mean = jnp.mean(x.astype(jnp.float32), axis=0) + 0.05
    a = 1 + 0.2 * jax.random.normal(keys[1], (k,))
    b = 0.1 * jax.random.normal(keys[2], (k,))
    w = (jax.random.normal(keys[3], (k, n)) / np.sqrt(k)).astype(dtype)
    dz = jax.random.normal(keys[4], (m, n)).astype(dtype)
    return x, mean, a, b, w, dz


def _f64(v):
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


def _relu_bn_rounded(x, mean, a, b, dtype):
    """relu((x - mean) * a + b) in float64, rounded to ``dtype`` as the kernels feed it to the dot."""
    y = np.maximum((_f64(x) - _f64(mean)) * _f64(a) + _f64(b), 0.0)
    return _f64(jnp.asarray(y, jnp.float32).astype(dtype))


def test_the_forward_kernel_multiplies_and_sums_like_float64(small_blocks):
    x, mean, a, b, w, _ = _operands(256, 64, 96)
    z, sums = matmul_moments(x, mean, a, b, w, out_dtype=jnp.bfloat16, interpret=True)
    want = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) @ _f64(w)
    # z is the float32 product rounded once to bf16 (2^-8 relative)
    np.testing.assert_allclose(_f64(z), want, rtol=2**-8, atol=1e-3)
    # the sums are those of z as stored, so computed from the returned z in float64
    zf = _f64(z)
    np.testing.assert_allclose(_f64(sums), np.stack([zf.sum(0), (zf * zf).sum(0)]), rtol=1e-5, atol=1e-3)


def test_without_a_prologue_the_forward_kernel_is_the_plain_product_and_its_sums(small_blocks):
    x, _, _, _, w, _ = _operands(256, 64, 96, seed=7)
    z, sums = matmul_moments(x, None, None, None, w, out_dtype=jnp.bfloat16, interpret=True)
    np.testing.assert_allclose(_f64(z), _f64(x) @ _f64(w), rtol=2**-8, atol=1e-3)
    zf = _f64(z)
    np.testing.assert_allclose(_f64(sums), np.stack([zf.sum(0), (zf * zf).sum(0)]), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="mean, a and b together"):
        matmul_moments(x, None, jnp.ones(64), None, w, out_dtype=jnp.bfloat16, interpret=True)


def test_the_weight_gradient_kernel_recomputes_the_activation_and_sums_like_float64(small_blocks):
    x, mean, a, b, _, dz = _operands(384, 32, 64, seed=1)
    dw = weight_grad(x, mean, a, b, dz, interpret=True)
    want = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16).T @ _f64(dz)
    np.testing.assert_allclose(_f64(dw), want, rtol=1e-5, atol=1e-3)
    # 384 rows of 16 are 24 steps: the smallest divisor of 24 giving >= 16 instances with
    # 2 x 2 channel blocks each is 4 row ranges
    assert pallas_fused_conv._row_splits(384, 16, 4, 16, 100) == 4
    assert pallas_fused_conv._row_splits(384, 16, 4, 10_000, 100) == 24  # as many as there are steps
    assert pallas_fused_conv._row_splits(384, 16, 4, 10_000, 10) == 8  # partial sums capped


def _affine_operands(m, n, seed):
    keys = jax.random.split(jax.random.key(seed), 5)
    g = jax.random.normal(keys[0], (m, n)).astype(jnp.bfloat16)
    z = (jax.random.normal(keys[1], (m, n)) + 0.5).astype(jnp.bfloat16)
    return g, z, 1 + 0.3 * jax.random.normal(keys[2], (n,)), 0.2 * jax.random.normal(keys[3], (n,)), \
        0.1 * jax.random.normal(keys[4], (n,))


def _affine_rounded(g, z, scale_g, scale_z, shift):
    """g * scale_g + z * scale_z + shift in float32 NumPy, in that order, rounded to bf16 as the
    kernels feed it to the dot (float64 before the rounding would round a few elements the
    other way)."""
    f32 = [np.asarray(jnp.asarray(v, jnp.float32)) for v in (g, z, scale_g, scale_z, shift)]
    dz = f32[0] * f32[2] + f32[1] * f32[3] + f32[4]
    return _f64(jnp.asarray(dz).astype(jnp.bfloat16))


def test_the_input_gradient_kernel_computes_dz_as_it_loads_and_multiplies_like_float64(small_blocks):
    g, z, scale_g, scale_z, shift = _affine_operands(256, 64, seed=12)
    w = (jax.random.normal(jax.random.key(13), (32, 64)) / 8).astype(jnp.bfloat16)
    dy = input_grad(g, z, scale_g, scale_z, shift, w, out_dtype=jnp.bfloat16, interpret=True)
    want = _affine_rounded(g, z, scale_g, scale_z, shift) @ _f64(w).T
    # dy is the float32 product rounded once to bf16
    np.testing.assert_allclose(_f64(dy), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
    # 48 output channels: not a power of two, so it declines (the op then uses XLA)
    assert input_grad(g[:, :48], z[:, :48], scale_g[:48], scale_z[:48], shift[:48], w[:, :48],
                      out_dtype=jnp.bfloat16, interpret=True) is None


def test_the_input_gradient_kernel_sums_the_previous_batch_norms_gradient_as_it_stores(small_blocks):
    """Change 12: with ``relu_bn_input`` the kernel also returns relu_grad_sums(x, dy): the
    column sums of g2 and g2 * (x - mean), g2 = the stored dy where the BatchNorm + ReLU that
    made the GEMM's input is positive, against float64 NumPy (the mask taken in float32, as
    the forward kernel takes it); dy is the same as without; XLA's fallback gives the same."""
    g, z, scale_g, scale_z, shift = _affine_operands(256, 64, seed=18)
    x, mean, a, b, _, _ = _operands(256, 32, 64, seed=19)
    w = (jax.random.normal(jax.random.key(20), (32, 64)) / 8).astype(jnp.bfloat16)
    plain = input_grad(g, z, scale_g, scale_z, shift, w, out_dtype=jnp.bfloat16, interpret=True)
    dy, sums = input_grad(g, z, scale_g, scale_z, shift, w, (x, mean, a, b), out_dtype=jnp.bfloat16, interpret=True)
    np.testing.assert_array_equal(dy, plain)
    centred32 = np.asarray(jnp.asarray(x, jnp.float32)) - np.asarray(mean)
    mask = centred32 * np.asarray(a) + np.asarray(b) > 0
    assert 0.2 < mask.mean() < 0.8  # both sides of the ReLU
    g2 = np.where(mask, _f64(dy), 0.0)
    want = np.stack([g2.sum(0), (g2 * centred32.astype(np.float64)).sum(0)])
    np.testing.assert_allclose(_f64(sums), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the Pallas BatchNorm's own kernel, which this replaces, sums the same
    np.testing.assert_allclose(sums, pallas_batch_norm.relu_grad_sums(x, dy, mean, a, b, interpret=True),
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())
    xla_dy, xla_sums = pallas_fused_conv._input_grad_xla(g, z, scale_g, scale_z, shift, w, (x, mean, a, b),
                                                         out_dtype=jnp.bfloat16)
    np.testing.assert_allclose(_f64(xla_dy), _f64(dy), rtol=2**-7, atol=2**-7 * np.abs(_f64(dy)).max())
    np.testing.assert_allclose(xla_sums, sums, rtol=0.02, atol=0.02 * np.abs(want).max())


def test_the_weight_gradient_kernel_takes_dz_as_an_affine_map_of_g_and_z(small_blocks):
    x, mean, a, b, _, _ = _operands(384, 32, 64, seed=14)
    affine = _affine_operands(384, 64, seed=15)
    dw = weight_grad(x, mean, a, b, affine, interpret=True)
    want = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16).T @ _affine_rounded(*affine)
    np.testing.assert_allclose(_f64(dw), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the XLA fallback computes the same
    np.testing.assert_allclose(pallas_fused_conv._weight_grad_xla(x, mean, a, b, affine), dw, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(_f64(affine_grad(*affine)),
                               _f64(affine[0]) * _f64(affine[2]) + _f64(affine[1]) * _f64(affine[3]) + _f64(affine[4]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prologue", [True, False], ids=["relu_bn", "plain"])
def test_the_weight_gradient_kernel_masks_dz_by_a_relus_output_and_stores_and_sums_it(small_blocks, prologue):
    """Given ``(dout, out)`` for dz, the kernel multiplies by the gradient through the ReLU whose
    output is ``out`` (dout where out > 0, else 0), and stores that gradient and its column sums
    (changes 16 and 17's reverse pass); 64 input channels in blocks of 16 are four instances per
    row range, of which only the first writes."""
    x, mean, a, b, _, dout = _operands(384, 64, 96, seed=16)
    out = jnp.maximum(jax.random.normal(jax.random.key(17), (384, 96)), 0.0).astype(jnp.bfloat16)
    bn = (mean, a, b) if prologue else (None, None, None)
    dw, g, sum_g = weight_grad(x, *bn, (dout, out), interpret=True)
    want_g = np.where(_f64(out) > 0, _f64(dout), 0.0)
    assert g.dtype == jnp.bfloat16 and g.shape == (384, 96) and 0.3 < float(np.mean(want_g == 0)) < 0.7
    np.testing.assert_array_equal(_f64(g), want_g)  # a mask is exact
    np.testing.assert_allclose(_f64(sum_g), want_g.sum(axis=0), rtol=1e-5, atol=1e-4)
    y = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) if prologue else _f64(x)
    want = y.T @ want_g
    np.testing.assert_allclose(_f64(dw), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    xla = pallas_fused_conv._weight_grad_xla(x, *bn, (dout, out))
    np.testing.assert_array_equal(_f64(xla[1]), want_g)
    np.testing.assert_allclose(_f64(xla[0]), _f64(dw), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(_f64(xla[2]), _f64(sum_g), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="colsum is not taken"):
        weight_grad(x, *bn, (dout, out), colsum=True, interpret=True)


def test_without_a_prologue_the_weight_gradient_kernel_is_the_plain_product_of_x_and_dz(small_blocks):
    x, _, _, _, _, _ = _operands(384, 32, 64, seed=18)
    affine = _affine_operands(384, 64, seed=19)
    dw = weight_grad(x, None, None, None, affine, interpret=True)
    want = _f64(x).T @ _affine_rounded(*affine)
    np.testing.assert_allclose(_f64(dw), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(pallas_fused_conv._weight_grad_xla(x, None, None, None, affine), dw, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="mean, a and b together"):
        weight_grad(x, jnp.zeros(32), None, None, affine, interpret=True)


@pytest.mark.parametrize("prologue", [True, False], ids=["relu_bn", "plain"])
def test_the_gram_kernel_multiplies_the_input_by_itself_and_sums_its_columns_like_float64(small_blocks, prologue):
    """Change 15's ``gram``: y^T y and y's column sums for y = relu_bn(x) (or x) as the GEMMs
    multiply it (rounded to bf16), from the weight-gradient kernel with y on both sides, over
    several channel blocks and row ranges; XLA's fallback gives the same."""
    x, mean, a, b, _, _ = _operands(384, 64, 32, seed=23)
    vectors = (mean, a, b) if prologue else (None, None, None)
    yy, colsum = pallas_fused_conv.gram(x, *vectors, interpret=True)
    y = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) if prologue else _f64(x)
    np.testing.assert_allclose(_f64(yy), y.T @ y, rtol=1e-5, atol=1e-5 * np.abs(y.T @ y).max())
    np.testing.assert_allclose(_f64(colsum), y.sum(0), rtol=1e-5, atol=1e-5 * np.abs(y.sum(0)).max())
    for got, want in zip(pallas_fused_conv._gram_xla(x, *vectors), (yy, colsum)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("prologue", [True, False], ids=["relu_bn", "plain"])
def test_the_gram_input_gradient_kernel_adds_the_input_times_p_and_c_like_float64(small_blocks, prologue):
    """Change 15's input-gradient GEMM: ``(g * scale_g) @ w^T + y @ p + c`` against float64
    NumPy (g * scale_g and y rounded to bf16 as the kernel feeds them to the dot); with
    the BatchNorm + ReLU before the GEMM it also sums its gradient as it stores dy (change
    12's epilogue, the Pallas BatchNorm's own sums of the same dy); XLA's fallback agrees;
    shapes it does not take are declined."""
    g, _, scale_g, _, _ = _affine_operands(256, 64, seed=24)
    x, mean, a, b, _, _ = _operands(256, 64, 64, seed=25)  # two blocks of 32 input channels
    w = (jax.random.normal(jax.random.key(26), (64, 64)) / 8).astype(jnp.bfloat16)
    p = (jax.random.normal(jax.random.key(27), (64, 64)) / 8).astype(jnp.bfloat16)
    c = 0.3 * jax.random.normal(jax.random.key(28), (64,))
    vectors = (mean, a, b) if prologue else (None, None, None)
    out = pallas_fused_conv.input_grad_gram(g, scale_g, w, x, *vectors, p, c, sums=prologue, out_dtype=jnp.bfloat16,
                                            interpret=True)
    dy, sums = out if prologue else (out, None)
    gs = _f64(jnp.asarray(np.asarray(jnp.asarray(g, jnp.float32)) * np.asarray(scale_g)).astype(jnp.bfloat16))
    y = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) if prologue else _f64(x)
    want = gs @ _f64(w).T + y @ _f64(p) + _f64(c)
    np.testing.assert_allclose(_f64(dy), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
    xla = pallas_fused_conv._input_grad_gram_xla(g, scale_g, w, x, *vectors, p, c, sums=prologue,
                                                 out_dtype=jnp.bfloat16)
    xla_dy = xla[0] if prologue else xla
    np.testing.assert_allclose(_f64(xla_dy), _f64(dy), rtol=2**-7, atol=2**-7 * np.abs(want).max())
    if prologue:
        want_sums = jnp.stack(pallas_batch_norm.relu_grad_sums(x, dy, mean, a, b, interpret=True))
        np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want_sums))))
    else:
        with pytest.raises(ValueError, match="give mean, a, b"):
            pallas_fused_conv.input_grad_gram(g, scale_g, w, x, None, None, None, p, c, sums=True,
                                              out_dtype=jnp.bfloat16, interpret=True)
    # 24 input channels: not a power of two, so it declines (the op then uses XLA)
    assert pallas_fused_conv.input_grad_gram(g, scale_g, w[:24], x[:, :24], None, None, None, p[:24, :24], c[:24],
                                             out_dtype=jnp.bfloat16, interpret=True) is None


def _reference(x, scale, bias, kernel, dtype):
    """The textbook block: whole-batch BatchNorm (biased variance), ReLU, 1x1 convolution in
    ``dtype``, and the means of its output and its square, in plain JAX."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(xf, axes), jnp.var(xf, axes)
    y = jax.nn.relu((xf - mean) / jnp.sqrt(var + EPS) * scale + bias).astype(dtype)
    z = jax.lax.conv_general_dilated(y, kernel.astype(dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    return z, jnp.stack([zf.mean(0), (zf * zf).mean(0)])


def _fused(x, scale, bias, kernel, dtype, interpret=True):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(xf * xf, axes) - mean * mean
    z, moments = bn_relu_conv1x1(x, mean, var, scale, bias, kernel, EPS, dtype, interpret)
    return z, jnp.stack(moments)


def _reference_bn3(x, scale, bias, kernel, next_scale, next_bias, dtype):
    """The textbook block with the next BatchNorm: u, and z's mean and biased variance stacked."""
    z, _ = _reference(x, scale, bias, kernel, dtype)
    zf = z.astype(jnp.float32)
    axes = tuple(range(z.ndim - 1))
    mean3, var3 = jnp.mean(zf, axes), jnp.var(zf, axes)
    u = ((zf - mean3) / jnp.sqrt(var3 + EPS) * next_scale + next_bias).astype(dtype)
    return u, jnp.stack([mean3, var3])


def _fused_bn3(x, scale, bias, kernel, next_scale, next_bias, dtype, interpret=True):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(xf * xf, axes) - mean * mean
    u, mean3, var3 = bn_relu_conv1x1_bn(x, mean, var, scale, bias, kernel, next_scale, next_bias, EPS, EPS, dtype,
                                        interpret)
    return u, jnp.stack([mean3, var3])


def _bn3_operands(shape, n, seed, dtype=jnp.float32):
    x, scale, bias, kernel, ct_u, ct_stats = _block_operands(shape, n, seed=seed, dtype=dtype)
    keys = jax.random.split(jax.random.key(seed + 100), 2)
    next_scale = 1 + 0.2 * jax.random.normal(keys[0], (n,))
    next_bias = 0.2 * jax.random.normal(keys[1], (n,))
    return (x, scale, bias, kernel, next_scale, next_bias), ct_u, ct_stats


def _block_operands(shape, n, seed=2, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    k = shape[-1]
    x = (jax.random.normal(keys[0], shape) + 0.5).astype(dtype)
    scale = 1 + 0.2 * jax.random.normal(keys[1], (k,))
    bias = 0.2 * jax.random.normal(keys[2], (k,))
    kernel = jax.random.normal(keys[3], (1, 1, k, n)) / np.sqrt(k)
    ct_z = jax.random.normal(keys[4], (*shape[:-1], n))
    ct_sums = jax.random.normal(keys[5], (2, n))
    return x, scale, bias, kernel, ct_z, ct_sums


def test_values_and_gradients_equal_the_textbook_block_in_float32(small_blocks):
    x, scale, bias, kernel, ct_z, ct_sums = _block_operands((2, 8, 8, 32), 64)

    def loss(fn, *params):
        z, sums = fn(*params, jnp.float32)
        return jnp.sum(z * ct_z) + jnp.sum(sums * ct_sums)

    fused = _fused
    np.testing.assert_allclose(loss(fused, x, scale, bias, kernel), loss(_reference, x, scale, bias, kernel),
                               rtol=1e-5)
    got = jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2, 3))(x, scale, bias, kernel)
    want = jax.grad(functools.partial(loss, _reference), argnums=(0, 1, 2, 3))(x, scale, bias, kernel)
    for name, g, w in zip(("x", "scale", "bias", "kernel"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)


def test_forward_mode_equals_the_textbook_block(small_blocks):
    x, scale, bias, kernel, _, _ = _block_operands((2, 8, 8, 32), 64, seed=3)
    tangents = tuple(jax.random.normal(jax.random.key(9 + i), v.shape) for i, v in enumerate((x, scale, bias, kernel)))
    got = jax.jvp(lambda *p: _fused(*p, jnp.float32), (x, scale, bias, kernel), tangents)
    want = jax.jvp(lambda *p: _reference(*p, jnp.float32), (x, scale, bias, kernel), tangents)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))
    # only the kernel's tangent (the BatchNorm's are symbolic zeros)
    only_kernel = jax.jvp(lambda k: _fused(x, scale, bias, k, jnp.float32), (kernel,), (tangents[3],))
    want_kernel = jax.jvp(lambda k: _reference(x, scale, bias, k, jnp.float32), (kernel,), (tangents[3],))
    np.testing.assert_allclose(only_kernel[1][0], want_kernel[1][0], rtol=1e-4, atol=1e-4)


def _conv_reference(x, kernel, dtype):
    """A 1x1 convolution in ``dtype`` (as ``nn.Conv``) and the means of its output and its square."""
    z = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    return z, jnp.stack([zf.mean(0), (zf * zf).mean(0)])


def _conv_fused(x, kernel, dtype, interpret=True):
    z, moments = conv1x1_moments(x, kernel, dtype, interpret)
    return z, jnp.stack(moments)


@pytest.mark.parametrize("shape,n", [((2, 8, 8, 32), 64), ((1, 4, 4, 24), 32)])  # the second: XLA's fallback
def test_the_convolution_with_its_statistics_equals_the_textbook_layers_in_both_modes(small_blocks, shape, n):
    """Values, reverse mode (the gradients of x and the kernel, through z and through the
    moments) and forward mode against a 1x1 convolution and two means in plain JAX (float32)."""
    x, _, _, kernel, ct_z, ct_sums = _block_operands(shape, n, seed=8)

    def loss(fn, x, kernel):
        z, moments = fn(x, kernel, jnp.float32)
        return jnp.sum(z * ct_z) + jnp.sum(moments * ct_sums)

    got_value, got = jax.value_and_grad(functools.partial(loss, _conv_fused), argnums=(0, 1))(x, kernel)
    want_value, want = jax.value_and_grad(functools.partial(loss, _conv_reference), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for name, g, w in zip(("x", "kernel"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)
    tangents = (jax.random.normal(jax.random.key(10), x.shape), jax.random.normal(jax.random.key(11), kernel.shape))
    got = jax.jvp(lambda *p: _conv_fused(*p, jnp.float32), (x, kernel), tangents)
    want = jax.jvp(lambda *p: _conv_reference(*p, jnp.float32), (x, kernel), tangents)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


def test_in_bf16_the_convolution_stores_z_and_sums_it_as_stored(small_blocks):
    x, _, _, kernel, _, _ = _block_operands((2, 8, 8, 32), 64, seed=9, dtype=jnp.bfloat16)
    z, moments = _conv_fused(x, kernel, jnp.bfloat16)
    z_ref, _ = _conv_reference(x, kernel, jnp.bfloat16)
    assert z.dtype == jnp.bfloat16 and moments.dtype == jnp.float32
    top = float(jnp.max(jnp.abs(z_ref.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(z.astype(jnp.float32) - z_ref.astype(jnp.float32)))) < 0.01 * top
    zf = _f64(z).reshape(-1, 64)
    np.testing.assert_allclose(_f64(moments), np.stack([zf.mean(0), (zf * zf).mean(0)]), rtol=1e-5, atol=1e-6)


def _assert_loss_and_gradients_equal(fused, reference, args, ct_out, ct_stats, names):
    """A loss of ``fn(*args, float32)``'s two outputs (the op's and its statistics, weighted by
    ``ct_out`` and ``ct_stats``) and its gradient with respect to every argument agree between
    ``fused`` and ``reference`` (1e-5 and 1e-4 of each gradient's largest element)."""

    def loss(fn, *params):
        out, stats = fn(*params, jnp.float32)
        return jnp.sum(out * ct_out) + jnp.sum(stats * ct_stats)

    argnums = tuple(range(len(args)))
    got_value, got = jax.value_and_grad(functools.partial(loss, fused), argnums=argnums)(*args)
    want_value, want = jax.value_and_grad(functools.partial(loss, reference), argnums=argnums)(*args)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)


NAMES_BN3 = ("x", "scale", "bias", "kernel", "next_scale", "next_bias")


@pytest.mark.parametrize("grad_sums", [False, True], ids=["relu_grad_sums", "input_grad_sums"])
@pytest.mark.parametrize("gram", [False, True], ids=["from_z", "gram"])
def test_with_the_next_batch_norm_values_and_gradients_equal_the_textbook_block_in_float32(small_blocks, monkeypatch,
                                                                                        grad_sums, gram):
    """u, z's statistics and the gradients of all six inputs, through u and through the
    statistics (their cotangents enter dz as it is computed in the kernels); bn2's backward
    sums by its own kernel, or in the input gradient's epilogue (change 12); bn3's gradient
    read from z, or through the GEMM's algebra without z (change 15)."""
    monkeypatch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", grad_sums)
    monkeypatch.setattr(pallas_fused_conv, "GRAM_BACKWARD", gram)
    args, ct_u, ct_stats = _bn3_operands((2, 8, 8, 32), 64, seed=16)

    _assert_loss_and_gradients_equal(_fused_bn3, _reference_bn3, args, ct_u, ct_stats, NAMES_BN3)
    # u alone (the statistics' cotangents then absent), and the kernel's gradient alone
    got = jax.grad(lambda x, k: jnp.sum(_fused_bn3(x, *args[1:3], k, *args[4:], jnp.float32)[0] * ct_u),
                   argnums=(0, 1))(args[0], args[3])
    want = jax.grad(lambda x, k: jnp.sum(_reference_bn3(x, *args[1:3], k, *args[4:], jnp.float32)[0] * ct_u),
                    argnums=(0, 1))(args[0], args[3])
    for name, g, w in zip(("x", "kernel"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)


def _assert_forward_mode_equal(fused, reference, args, tangents, subsets):
    """``jax.jvp`` of ``fused(*args, float32)`` equals ``reference``'s (1e-4) with the tangents of
    each subset of ``args`` (indices) present and the others symbolic zeros."""
    for present in subsets:
        def at(fn, *moving, present=present):
            full = list(args)
            for i, v in zip(present, moving):
                full[i] = v
            return fn(*full, jnp.float32)

        primals = tuple(args[i] for i in present)
        tans = tuple(tangents[i] for i in present)
        got = jax.jvp(functools.partial(at, fused), primals, tans)
        want = jax.jvp(functools.partial(at, reference), primals, tans)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=str(present))


def test_with_the_next_batch_norm_forward_mode_equals_the_textbook_block(small_blocks):
    args, _, _ = _bn3_operands((2, 8, 8, 32), 64, seed=17)
    tangents = tuple(jax.random.normal(jax.random.key(30 + i), v.shape) for i, v in enumerate(args))
    # all; the kernel's alone; the next BatchNorm's alone
    _assert_forward_mode_equal(_fused_bn3, _reference_bn3, args, tangents, ((0, 1, 2, 3, 4, 5), (3,), (4, 5)))


def test_in_bf16_the_block_stays_within_rounding_of_the_textbook_one(small_blocks):
    x, scale, bias, kernel, ct_z, ct_sums = _block_operands((2, 8, 8, 32), 64, seed=4, dtype=jnp.bfloat16)
    z, sums = _fused(x, scale, bias, kernel, jnp.bfloat16)
    z_ref, sums_ref = _reference(x, scale, bias, kernel, jnp.bfloat16)
    # z is stored in bf16 and returned as its float32 view (what bn3 normalises)
    assert z.dtype == sums.dtype == jnp.float32
    np.testing.assert_array_equal(z, z.astype(jnp.bfloat16).astype(jnp.float32))
    top = float(jnp.max(jnp.abs(z_ref.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(z.astype(jnp.float32) - z_ref.astype(jnp.float32)))) < 0.02 * top
    np.testing.assert_allclose(sums, sums_ref, rtol=0.02, atol=0.02 * float(jnp.max(jnp.abs(sums_ref))))


def test_in_bf16_the_gradient_without_z_is_as_accurate_as_the_one_read_from_z(small_blocks, monkeypatch):
    """Change 15 takes bn3's gradient through y^T g, y^T y and ``y @ (w diag(s) w^T)`` where
    change 11 reads the stored z: in bf16 the roundings differ (z's own against that of p and
    of ``g * a3``). Against the textbook block in float32, the bf16 gradients of x, the kernel
    and bn3's scale stay as close with the one as with the other (within 1.5x the error of
    the path read from z, itself a few bf16 steps), for a kernel whose z has a mean ~10 times
    its standard deviation (bn3's centring then cancels most of z's terms: the hard case for
    sums taken from z's products)."""
    args, ct_u, ct_stats = _bn3_operands((2, 8, 8, 32), 64, seed=29)
    x = args[0].astype(jnp.bfloat16).astype(jnp.float32)  # x as bf16 stores it, for the reference too
    args = (x, args[1], args[2] + 2.0, args[3] + 0.5, *args[4:])  # y = relu(bn2(x)) mostly positive
    z, _ = _reference(x, *args[1:4], jnp.float32)
    assert float(jnp.min(jnp.abs(jnp.mean(z, (0, 1, 2))) / jnp.std(z, (0, 1, 2)))) > 8  # measured 9.3

    def loss(fn, dtype, x, kernel, next_scale):
        u, stats = fn(x.astype(dtype), *args[1:3], kernel, next_scale, args[5], dtype)
        return jnp.sum(u.astype(jnp.float32) * ct_u) + jnp.sum(stats * ct_stats)

    want = jax.grad(functools.partial(loss, _reference_bn3, jnp.float32), argnums=(0, 1, 2))(*args[:1], *args[3:5])
    errors = {}
    for gram in (False, True):
        monkeypatch.setattr(pallas_fused_conv, "GRAM_BACKWARD", gram)
        got = jax.grad(functools.partial(loss, _fused_bn3, jnp.bfloat16), argnums=(0, 1, 2))(*args[:1], *args[3:5])
        errors[gram] = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
                        for g, w in zip(got, want)]
    for name, from_z, gram in zip(("x", "kernel", "next_scale"), errors[False], errors[True]):
        assert from_z < 0.05, (name, errors)
        assert gram <= 1.5 * from_z + 2**-9, (name, errors)


def _reference_tail(x, scale, bias, kernel, next_scale, next_bias, residual, dtype):
    """The textbook Bottleneck tail: :func:`_reference_bn3`'s u, plus the residual, ReLU'd."""
    u, stats = _reference_bn3(x, scale, bias, kernel, next_scale, next_bias, dtype)
    return jax.nn.relu(u + residual.astype(dtype)), stats


def _fused_tail(x, scale, bias, kernel, next_scale, next_bias, residual, dtype, interpret=True):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(xf * xf, axes) - mean * mean
    out, mean3, var3 = pallas_fused_conv.bn_relu_conv1x1_bn_add_relu(
        x, mean, var, scale, bias, kernel, next_scale, next_bias, residual, EPS, EPS, dtype, interpret)
    return out, jnp.stack([mean3, var3])


def _tail_operands(shape, n, seed):
    args, ct_out, ct_stats = _bn3_operands(shape, n, seed=seed)
    residual = jax.random.normal(jax.random.key(seed + 300), ct_out.shape)
    return (*args, residual), ct_out, ct_stats


NAMES_TAIL = (*NAMES_BN3, "residual")


def test_the_residual_kernel_applies_the_next_batch_norm_adds_and_rectifies_like_float64(small_blocks):
    """Change 16's forward GEMM: ``relu((relu_bn(x) @ w) * a3 + b3 + r)`` against float64 NumPy
    (the GEMM's input rounded to bf16 as it is fed to the dot), stored once in bf16; XLA's
    fallback agrees."""
    x, mean, a, b, w, _ = _operands(256, 64, 96, seed=31)
    keys = jax.random.split(jax.random.key(32), 3)
    a3, b3 = 1 + 0.3 * jax.random.normal(keys[0], (96,)), 0.5 * jax.random.normal(keys[1], (96,))
    r = jax.random.normal(keys[2], (256, 96)).astype(jnp.bfloat16)
    out = pallas_fused_conv.matmul_bn_add_relu(x, mean, a, b, w, a3, b3, r, interpret=True)
    z = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) @ _f64(w)
    want = np.maximum(z * _f64(a3) + _f64(b3) + _f64(r), 0.0)
    assert out.dtype == jnp.bfloat16 and 0.2 < float(jnp.mean(out > 0)) < 0.8
    np.testing.assert_allclose(_f64(out), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
    xla = pallas_fused_conv._matmul_bn_add_relu_xla(x, mean, a, b, w, a3, b3, r)
    np.testing.assert_allclose(_f64(xla), _f64(out), rtol=2**-7, atol=2**-7 * np.abs(want).max())


@pytest.mark.parametrize("grad_sums", [False, True], ids=["relu_grad_sums", "input_grad_sums"])
def test_with_the_residual_values_and_gradients_equal_the_textbook_tail_in_float32(small_blocks, monkeypatch,
                                                                                grad_sums):
    """Change 16's op (bn2 + ReLU, conv3, bn3, the residual add and ReLU; bn3's statistics from
    y^T y, z never stored): the output, z's statistics and the gradients of all seven inputs,
    through the output and through the statistics; the output's gradient alone; and forward
    mode with the subsets of tangents the model meets, against the textbook layers in plain JAX
    (float32)."""
    monkeypatch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", grad_sums)
    args, ct_out, ct_stats = _tail_operands((2, 8, 8, 32), 64, seed=33)

    _assert_loss_and_gradients_equal(_fused_tail, _reference_tail, args, ct_out, ct_stats, NAMES_TAIL)
    got = jax.grad(lambda x, r: jnp.sum(_fused_tail(x, *args[1:6], r, jnp.float32)[0] * ct_out),
                   argnums=(0, 1))(args[0], args[6])
    want = jax.grad(lambda x, r: jnp.sum(_reference_tail(x, *args[1:6], r, jnp.float32)[0] * ct_out),
                    argnums=(0, 1))(args[0], args[6])
    for name, g, w in zip(("x", "residual"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)
    tangents = tuple(jax.random.normal(jax.random.key(50 + i), v.shape) for i, v in enumerate(args))
    _assert_forward_mode_equal(_fused_tail, _reference_tail, args, tangents,
                               ((0, 1, 2, 3, 4, 5, 6), (3,), (4, 5), (0, 6)))


def test_in_bf16_the_tail_stays_within_rounding_of_the_textbook_one(small_blocks):
    """In bf16 the output is the textbook tail's within a few bf16 steps (z's statistics are
    taken from z as the GEMM computes it, in float32, where the model takes them from z rounded
    to bf16), and the gradients within 3% of the largest element of those of the textbook tail
    with the same ReLU mask (outputs within rounding of 0 may land on either side of the ReLU
    in bf16, which moves a gradient on 128 rows by several percent whichever side is right)."""
    args, ct_out, _ = _tail_operands((2, 8, 8, 32), 64, seed=34)
    args = (args[0].astype(jnp.bfloat16), *args[1:])
    out, stats = _fused_tail(*args, jnp.bfloat16)
    out_ref, stats_ref = _reference_tail(*args, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f64(out), _f64(out_ref), rtol=0.02, atol=0.03)
    np.testing.assert_allclose(stats, stats_ref, rtol=0.01, atol=0.01 * float(jnp.max(jnp.abs(stats_ref))))
    passes = out > 0

    def same_mask(x, scale, bias, kernel, next_scale, next_bias, residual, dtype):
        u, stats = _reference_bn3(x, scale, bias, kernel, next_scale, next_bias, dtype)
        return jnp.where(passes, u + residual.astype(dtype), 0), stats

    def loss(fn, x, kernel, residual):
        return jnp.sum(fn(x, *args[1:3], kernel, *args[4:6], residual, jnp.bfloat16)[0].astype(jnp.float32) * ct_out)

    got = jax.grad(functools.partial(loss, _fused_tail), argnums=(0, 1, 2))(args[0], args[3], args[6])
    want = jax.grad(functools.partial(loss, same_mask), argnums=(0, 1, 2))(args[0], args[3], args[6])
    for name, g, w in zip(("x", "kernel", "residual"), got, want):
        top = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) < 0.03 * top, name


def _reference_projection_tail(x, scale, bias, kernel, next_scale, next_bias, shortcut_input, shortcut_kernel,
                               shortcut_scale, shortcut_bias, dtype):
    """The textbook projection Bottleneck's tail: :func:`_reference_bn3`'s u plus the projection
    shortcut (:func:`_reference_conv_bn`), ReLU'd; both BatchNorms' statistics stacked."""
    u, stats = _reference_bn3(x, scale, bias, kernel, next_scale, next_bias, dtype)
    us, shortcut_stats = _reference_conv_bn(shortcut_input, shortcut_kernel, shortcut_scale, shortcut_bias, dtype)
    return jax.nn.relu(u + us), jnp.concatenate([stats, shortcut_stats])


def _fused_projection_tail(x, scale, bias, kernel, next_scale, next_bias, shortcut_input, shortcut_kernel,
                           shortcut_scale, shortcut_bias, dtype, interpret=True):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(xf * xf, axes) - mean * mean
    out, *stats = pallas_fused_conv.bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
        x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut_input, shortcut_kernel, shortcut_scale,
        shortcut_bias, EPS, EPS, EPS, dtype, interpret)
    return out, jnp.stack(stats)


def _projection_tail_operands(shape, n, shortcut_channels, seed):
    args, ct_out, ct_stats = _bn3_operands(shape, n, seed=seed)
    shortcut, _, _ = _conv_bn_operands((*shape[:-1], shortcut_channels), n, seed=seed + 400)
    ct_stats = jnp.concatenate([ct_stats, jax.random.normal(jax.random.key(seed + 500), ct_stats.shape)])
    return (*args, *shortcut), ct_out, ct_stats


NAMES_PROJECTION_TAIL = (*NAMES_BN3, "shortcut_input", "shortcut_kernel", "shortcut_scale", "shortcut_bias")


def test_the_projection_kernel_computes_both_gemms_adds_and_rectifies_like_float64(small_blocks):
    """Change 17's forward GEMM: ``relu((relu_bn(x) @ w) * a3 + b3 + (xs @ ws) * as + bs)`` against
    float64 NumPy, stored once in bf16; the shortcut's input narrower than x's (64 against 32
    channels: its loop is shorter) and wider; XLA's fallback agrees."""
    for shortcut_channels in (16, 128):
        x, mean, a, b, w, _ = _operands(256, 32, 96, seed=35)
        xs, _, _, _, ws, _ = _operands(256, shortcut_channels, 96, seed=36)
        keys = jax.random.split(jax.random.key(37), 4)
        a3, b3, a_s, b_s = (1 + 0.3 * jax.random.normal(keys[0], (96,)), 0.5 * jax.random.normal(keys[1], (96,)),
                            1 + 0.3 * jax.random.normal(keys[2], (96,)), 0.5 * jax.random.normal(keys[3], (96,)))
        out = pallas_fused_conv.matmul_bn_add_matmul_bn_relu(x, mean, a, b, w, a3, b3, xs, ws, a_s, b_s,
                                                             out_dtype=jnp.bfloat16, interpret=True)
        z = _relu_bn_rounded(x, mean, a, b, jnp.bfloat16) @ _f64(w)
        want = np.maximum(z * _f64(a3) + _f64(b3) + (_f64(xs) @ _f64(ws)) * _f64(a_s) + _f64(b_s), 0.0)
        assert out.dtype == jnp.bfloat16 and 0.2 < float(jnp.mean(out > 0)) < 0.8
        np.testing.assert_allclose(_f64(out), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
        xla = pallas_fused_conv._matmul_bn_add_matmul_bn_relu_xla(x, mean, a, b, w, a3, b3, xs, ws, a_s, b_s,
                                                                  jnp.bfloat16)
        np.testing.assert_allclose(_f64(xla), _f64(out), rtol=2**-7, atol=2**-7 * np.abs(want).max())
    # 24 shortcut channels: not a power of two, so it declines (the op then uses XLA)
    assert pallas_fused_conv.matmul_bn_add_matmul_bn_relu(x, mean, a, b, w, a3, b3, xs[:, :24], ws[:24], a_s, b_s,
                                                          out_dtype=jnp.bfloat16, interpret=True) is None


@pytest.mark.parametrize("grad_sums", [False, True], ids=["relu_grad_sums", "input_grad_sums"])
def test_with_the_projection_values_and_gradients_equal_the_textbook_tail_in_float32(small_blocks, monkeypatch,
                                                                                  grad_sums):
    """Change 17's op (change 16's with a projection shortcut, a 1x1 convolution and its BatchNorm,
    computed in the same GEMM; neither convolution's output stored): the output, both
    BatchNorms' statistics and the gradients of all ten inputs, through the output and through
    the statistics, and forward mode with the subsets of tangents the model meets, against the
    textbook layers in plain JAX (float32); the shortcut's input as wide as x (the kernel), and
    24 channels wide (not a power of two: XLA's fallback)."""
    monkeypatch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", grad_sums)
    for shortcut_channels in (32, 24):
        args, ct_out, ct_stats = _projection_tail_operands((2, 8, 8, 32), 64, shortcut_channels, seed=38)
        _assert_loss_and_gradients_equal(_fused_projection_tail, _reference_projection_tail, args, ct_out, ct_stats,
                                         NAMES_PROJECTION_TAIL)
    tangents = tuple(jax.random.normal(jax.random.key(60 + i), v.shape) for i, v in enumerate(args))
    _assert_forward_mode_equal(_fused_projection_tail, _reference_projection_tail, args, tangents,
                               (tuple(range(10)), (3, 7), (4, 5, 8, 9), (0, 6)))
    with pytest.raises(ValueError, match="every s-th pixel"):
        _fused_projection_tail(*args[:6], args[6][:, ::2, ::2], *args[7:], jnp.float32)


def _reference_conv_bn(x, kernel, scale, bias, dtype):
    """The textbook projection shortcut: a 1x1 convolution in ``dtype``, then a whole-batch
    BatchNorm (biased variance) of its output in float32; u and z's mean and variance stacked."""
    z, _ = _conv_reference(x, kernel, dtype)
    zf = z.astype(jnp.float32)
    axes = tuple(range(z.ndim - 1))
    mean, var = jnp.mean(zf, axes), jnp.var(zf, axes)
    return ((zf - mean) / jnp.sqrt(var + EPS) * scale + bias).astype(dtype), jnp.stack([mean, var])


def _fused_conv_bn(x, kernel, scale, bias, dtype, interpret=True):
    u, mean, var = conv1x1_bn(x, kernel, scale, bias, EPS, dtype, interpret)
    return u, jnp.stack([mean, var])


def _conv_bn_operands(shape, n, seed):
    x, _, _, kernel, ct_u, ct_stats = _block_operands(shape, n, seed=seed)
    keys = jax.random.split(jax.random.key(seed + 200), 2)
    return (x, kernel, 1 + 0.2 * jax.random.normal(keys[0], (n,)), 0.2 * jax.random.normal(keys[1], (n,))), \
        ct_u, ct_stats


@pytest.mark.parametrize("shape,n", [((2, 8, 8, 32), 64), ((1, 4, 4, 24), 32)])  # the second: XLA's fallback
@pytest.mark.parametrize("gram", [False, True], ids=["from_z", "gram"])
def test_the_convolution_with_its_batch_norm_equals_the_textbook_shortcut_in_both_modes(small_blocks, monkeypatch,
                                                                                       shape, n, gram):
    """Change 13's op: u, z's statistics and the gradients of x, the kernel, the scale and the
    bias, through u and through the statistics, and forward mode with every subset of tangents
    the model meets, against the convolution and BatchNorm in plain JAX (float32); the
    BatchNorm's gradient read from z, or without z (change 15)."""
    monkeypatch.setattr(pallas_fused_conv, "GRAM_BACKWARD", gram)
    args, ct_u, ct_stats = _conv_bn_operands(shape, n, seed=21)

    _assert_loss_and_gradients_equal(_fused_conv_bn, _reference_conv_bn, args, ct_u, ct_stats,
                                     ("x", "kernel", "scale", "bias"))
    # u alone (the statistics' cotangents absent), the kernel's gradient alone
    got = jax.grad(lambda k: jnp.sum(_fused_conv_bn(args[0], k, *args[2:], jnp.float32)[0] * ct_u))(args[1])
    want = jax.grad(lambda k: jnp.sum(_reference_conv_bn(args[0], k, *args[2:], jnp.float32)[0] * ct_u))(args[1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    tangents = tuple(jax.random.normal(jax.random.key(40 + i), v.shape) for i, v in enumerate(args))
    _assert_forward_mode_equal(_fused_conv_bn, _reference_conv_bn, args, tangents, ((0, 1, 2, 3), (0,), (1,), (2, 3)))


@pytest.mark.parametrize("gram", [False, True], ids=["from_z", "gram"])
def test_in_bf16_the_convolution_with_its_batch_norm_stays_within_rounding_of_the_textbook_one(small_blocks,
                                                                                              monkeypatch, gram):
    monkeypatch.setattr(pallas_fused_conv, "GRAM_BACKWARD", gram)
    (x, kernel, scale, bias), ct_u, _ = _conv_bn_operands((2, 8, 8, 32), 64, seed=22)
    x = x.astype(jnp.bfloat16)
    u, stats = _fused_conv_bn(x, kernel, scale, bias, jnp.bfloat16)
    u_ref, stats_ref = _reference_conv_bn(x, kernel, scale, bias, jnp.bfloat16)
    assert u.dtype == jnp.bfloat16 and stats.dtype == jnp.float32
    # one bf16 rounding of z apart (2^-8 relative), normalised: a few bf16 steps of u
    np.testing.assert_allclose(_f64(u), _f64(u_ref), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(stats, stats_ref, rtol=0.01, atol=0.01 * float(jnp.max(jnp.abs(stats_ref))))
    dx, dk = jax.grad(lambda x, k: jnp.sum(_fused_conv_bn(x, k, scale, bias, jnp.bfloat16)[0].astype(jnp.float32)
                                           * ct_u), argnums=(0, 1))(x, kernel)
    dx_ref, dk_ref = jax.grad(lambda x, k: jnp.sum(_reference_conv_bn(x, k, scale, bias, jnp.bfloat16)[0].astype(
        jnp.float32) * ct_u), argnums=(0, 1))(x, kernel)
    assert dx.dtype == jnp.bfloat16
    for g, w in ((dx, dx_ref), (dk, dk_ref)):
        top = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) < 0.03 * top


def test_shapes_the_kernels_do_not_take_run_in_xla():
    # 24 input channels: not a power of two, so the forward kernel declines and XLA computes it
    x, mean, a, b, w, dz = _operands(64, 24, 32)
    assert matmul_moments(x, mean, a, b, w, out_dtype=jnp.bfloat16, interpret=True) is None
    assert weight_grad(x[:, :8], mean[:8], a[:8], b[:8], dz, interpret=True) is None  # 8 channels: too few
    shape_x, scale, bias, kernel, ct_z, ct_sums = _block_operands((1, 4, 4, 24), 32, seed=5)
    got = jax.grad(lambda *p: jnp.sum(_fused(*p, jnp.float32)[0] * ct_z), argnums=(0, 3))(shape_x, scale, bias, kernel)
    want = jax.grad(lambda *p: jnp.sum(_reference(*p, jnp.float32)[0] * ct_z), argnums=(0, 3))(
        shape_x, scale, bias, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _compiled_for_an_h100(block, shapes, ct_shapes):
    """The optimised HLO text of ``block``'s forward and backward pass (``jax.vjp``; the first
    output, float32 in the model's view, is returned stored in bf16, as the model stores it),
    compiled for an H100 without one. ``shapes`` and ``ct_shapes``: (shape, dtype) of the inputs
    and of the outputs' cotangents."""
    from benchmarks.gpu_compile_report import DEFAULT_TARGET, target_devices

    device = target_devices(DEFAULT_TARGET)[0]

    def step(*args):
        outs, pullback = jax.vjp(block, *args[:len(shapes)])
        return outs[0].astype(jnp.bfloat16), outs[1:], pullback(args[len(shapes):])

    spec = functools.partial(jax.ShapeDtypeStruct, sharding=jax.sharding.SingleDeviceSharding(device))
    with jax.default_device(device):
        return jax.jit(step).lower(*[spec(*s) for s in (*shapes, *ct_shapes)]).compile().as_text()


def _traffic(hlo: str) -> int:
    from benchmarks.hlo_traffic import entry_kernels, summarise

    return summarise(entry_kernels(hlo))["traffic_bytes"]


def _cudnn_calls(hlo: str, backward: bool) -> list[str]:
    """The cuDNN custom calls of the forward pass, or of the backward pass (the ones JAX's
    transposition made: ``transpose(`` in their op name), sorted."""
    import re

    calls = re.findall(r'custom_call_target="(__cudnn\$\w+)".*?op_name="([^"]*)"', hlo)
    return sorted(target for target, op in calls if ("transpose(" in op) == backward)


def test_compiled_for_an_h100_the_block_is_two_kernels_on_the_tensor_cores_and_moves_fewer_bytes():
    require_cuda_plugin()
    shape, n, dtype = (32, 28, 28, 64), 256, jnp.bfloat16

    def model_block(x, scale, bias, kernel):
        """What the model runs on a GPU today: bn2 + ReLU, cuDNN's 1x1 convolution, bn3's statistics."""
        xf = x.astype(jnp.float32)
        mean, mean_sq = pallas_batch_norm.batch_moments(xf.reshape(-1, shape[-1]), dtype)
        y = pallas_batch_norm.bn_relu_apply(x, mean, mean_sq - mean * mean, scale, bias, EPS, dtype)
        z = jax.lax.conv_general_dilated(y, kernel.astype(dtype), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")).astype(jnp.float32)
        return z, jnp.stack(pallas_batch_norm.batch_moments(z.reshape(-1, n), dtype))

    def fused_block(x, scale, bias, kernel):
        xf = x.astype(jnp.float32)
        mean, mean_sq = pallas_batch_norm.batch_moments(xf.reshape(-1, shape[-1]), dtype)
        z, moments = bn_relu_conv1x1(x, mean, mean_sq - mean * mean, scale, bias, kernel, EPS, dtype)
        return z, jnp.stack(moments)

    # z stored in bf16 as in the model (bn3 reads its float32 view); the statistics are used (by
    # bn3), so returned
    shapes = [(shape, dtype), (shape[-1:], jnp.float32), (shape[-1:], jnp.float32), ((1, 1, shape[-1], n), jnp.float32)]
    ct_shapes = [((*shape[:-1], n), jnp.float32), ((2, n), jnp.float32)]
    model_hlo, fused_hlo = (_compiled_for_an_h100(b, shapes, ct_shapes) for b in (model_block, fused_block))
    assert "bn_relu_matmul_moments" in fused_hlo and "bn_relu_matmul_weight_grad" in fused_hlo
    assert "cudnn$convBackwardFilter" in model_hlo and "cudnn$convBackwardFilter" not in fused_hlo
    # bn2's output neither written nor read back (2 units of x) and bn3's statistics without a
    # pass of their own (1 unit of z, 4 of x), less the partial sums the kernels write and XLA
    # reads back (here 1.2 units: the weight gradient's 28 ranges of 64 x 256 float32)
    x_bytes = 32 * 28 * 28 * 64 * 2
    assert _traffic(fused_hlo) < _traffic(model_hlo) - 4.5 * x_bytes


def test_compiled_for_an_h100_with_the_next_batch_norm_its_gradient_is_never_stored():
    """bn2 + ReLU, conv3, bn3, the residual add and ReLU: with bn3 outside the fused op (change 9)
    XLA runs bn3's backward as two passes over z's width, the second writing dz for conv3's two
    backward GEMMs; with bn3 inside (``bn_relu_conv1x1_bn``) the GEMMs compute dz as they load g
    and z: that second pass goes (3 units of z) and each GEMM reads one more (2), so the block
    moves about a unit of z less (measured 0.82 at this batch of 32, where the weight gradient's
    partial sums take more; the ResNet-50 step at batch 256 saves a unit per block), and XLA's
    input-gradient GEMM is replaced by ours. With change 12 that GEMM also sums bn2's backward
    statistics."""
    require_cuda_plugin()
    shape, n, dtype = (32, 28, 28, 64), 256, jnp.bfloat16

    def statistics(x):
        mean, mean_sq = pallas_batch_norm.batch_moments(x.astype(jnp.float32).reshape(-1, shape[-1]), dtype)
        return mean, mean_sq - mean * mean

    def bn3_outside(x, scale, bias, kernel, next_scale, next_bias, shortcut):
        zf, (mean3, mean_sq3) = bn_relu_conv1x1(x, *statistics(x), scale, bias, kernel, EPS, dtype)
        var3 = mean_sq3 - mean3 * mean3
        u = ((zf - mean3) * jax.lax.rsqrt(var3 + EPS) * next_scale + next_bias).astype(dtype)
        return (jax.nn.relu(u + shortcut),)

    def bn3_inside(x, scale, bias, kernel, next_scale, next_bias, shortcut):
        u, _, _ = bn_relu_conv1x1_bn(x, *statistics(x), scale, bias, kernel, next_scale, next_bias, EPS, EPS, dtype)
        return (jax.nn.relu(u + shortcut),)

    vectors = [((shape[-1],), jnp.float32)] * 2
    shapes = [(shape, dtype), *vectors, ((1, 1, shape[-1], n), jnp.float32), ((n,), jnp.float32), ((n,), jnp.float32),
              ((*shape[:-1], n), dtype)]
    ct_shapes = [((*shape[:-1], n), dtype)]
    outside_hlo, inside_hlo = (_compiled_for_an_h100(b, shapes, ct_shapes) for b in (bn3_outside, bn3_inside))
    assert "affine_grad_matmul" in inside_hlo and "bn_relu_matmul_weight_grad_affine" in inside_hlo
    assert "affine_grad_matmul" not in outside_hlo
    z_bytes = 32 * 28 * 28 * n * 2
    assert _traffic(inside_hlo) < _traffic(outside_hlo) - 0.7 * z_bytes

    # change 12: bn2's backward sums in the input gradient's epilogue, which reads x there (1
    # unit of x) where the Pallas BatchNorm's sums kernel read x and dy (2): 0.95 units less
    # measured, the rest being the epilogue's partial sums
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", True)
        sums_hlo = _compiled_for_an_h100(bn3_inside, shapes, ct_shapes)
    assert "affine_grad_matmul_relu_grad_sums" in sums_hlo and "batch_norm_relu_grad_sums" in inside_hlo
    assert "batch_norm_relu_grad_sums" not in sums_hlo
    x_bytes = 32 * 28 * 28 * shape[-1] * 2
    assert _traffic(sums_hlo) < _traffic(inside_hlo) - 0.9 * x_bytes

    # change 15 (with 12): no backward kernel reads z. By count, 3 units of z less (the kernel
    # that makes g no longer reads it for bn3's sums, nor do the two GEMMs), for one more pass
    # over x (y^T y, a quarter unit); measured 4.5 units less, as XLA also stops keeping z
    # apart for the backward pass
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", True)
        patch.setattr(pallas_fused_conv, "GRAM_BACKWARD", True)
        gram_hlo = _compiled_for_an_h100(bn3_inside, shapes, ct_shapes)
    assert "gram_grad_matmul_relu_grad_sums" in gram_hlo and "bn_relu_gram" in gram_hlo
    assert "affine_grad_matmul" not in gram_hlo and "matmul_weight_grad_affine" not in gram_hlo
    assert _traffic(gram_hlo) < _traffic(sums_hlo) - 3.5 * z_bytes

    # change 16: bn3, the residual add and ReLU in the forward GEMM's epilogue, its statistics
    # from y^T y: z is neither written nor read back (2 units of z). Measured 1.05 units less
    # here, where XLA had folded the add's forward pass into the kernel that makes g (the
    # block's output has no other reader); in the ResNet-50 step, 2.06 units per identity block.
    # With change 18 the ReLU's mask is applied by the y^T g kernel, which stores g: XLA's pass
    # that read the output's gradient and the output and wrote g (3 units) goes for the kernel's
    # reading the two instead of g (1 more) and writing g (1): measured 1.86 units less in all
    def residual_inside(x, scale, bias, kernel, next_scale, next_bias, shortcut):
        out, _, _ = pallas_fused_conv.bn_relu_conv1x1_bn_add_relu(
            x, *statistics(x), scale, bias, kernel, next_scale, next_bias, shortcut, EPS, EPS, dtype)
        return (out,)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", True)
        residual_hlo = _compiled_for_an_h100(residual_inside, shapes, ct_shapes)
    assert "bn_relu_matmul_bn_add_relu" in residual_hlo and "bn_relu_matmul_moments" not in residual_hlo
    assert "bn_relu_matmul_weight_grad_relu_mask" in residual_hlo
    assert _traffic(residual_hlo) < _traffic(gram_hlo) - 1.7 * z_bytes
    from benchmarks.hlo_traffic import entry_kernels

    # no kernel of XLA's in the backward pass reads a whole unit of z (the output's gradient)
    xla_backward = [k for k in entry_kernels(residual_hlo) if k.phase == "backward" and k.kind.startswith("fusion")]
    assert xla_backward and max(k.read_bytes for k in xla_backward) < 0.6 * z_bytes


def test_compiled_for_an_h100_the_projection_block_stores_neither_convolutions_output():
    """A projection Bottleneck's tail (bn2 + ReLU, conv3, bn3, the shortcut's 1x1 convolution and
    BatchNorm, the add and ReLU; changes 11, 13 and 15 on): as the model runs it, each GEMM
    stores its output and XLA applies both BatchNorms in the add's kernel (z and the shortcut's
    z written, read back, the output written: 5 units of z); with change 17 one kernel computes
    both GEMMs and stores only the output, both BatchNorms' statistics from Gram matrices of
    the GEMMs' inputs (a quarter unit each here), which the backward pass then reuses.
    Measured 4.1 units of z less."""
    require_cuda_plugin()
    shape, n, dtype = (32, 28, 28, 64), 256, jnp.bfloat16

    def statistics(x):
        mean, mean_sq = pallas_batch_norm.batch_moments(x.astype(jnp.float32).reshape(-1, shape[-1]), dtype)
        return mean, mean_sq - mean * mean

    def separate(x, scale, bias, kernel, next_scale, next_bias, xs, shortcut_kernel, shortcut_scale, shortcut_bias):
        u, _, _ = bn_relu_conv1x1_bn(x, *statistics(x), scale, bias, kernel, next_scale, next_bias, EPS, EPS, dtype)
        us, _, _ = conv1x1_bn(xs, shortcut_kernel, shortcut_scale, shortcut_bias, EPS, dtype)
        return (jax.nn.relu(u + us),)

    def one_op(x, scale, bias, kernel, next_scale, next_bias, xs, shortcut_kernel, shortcut_scale, shortcut_bias):
        out, *_ = pallas_fused_conv.bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
            x, *statistics(x), scale, bias, kernel, next_scale, next_bias, xs, shortcut_kernel, shortcut_scale,
            shortcut_bias, EPS, EPS, EPS, dtype)
        return (out,)

    vectors = [((shape[-1],), jnp.float32)] * 2
    kernel_and_norm = [((1, 1, shape[-1], n), jnp.float32), ((n,), jnp.float32), ((n,), jnp.float32)]
    shapes = [(shape, dtype), *vectors, *kernel_and_norm, (shape, dtype), *kernel_and_norm]
    ct_shapes = [((*shape[:-1], n), dtype)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pallas_fused_conv, "GRAM_BACKWARD", True)
        separate_hlo, one_op_hlo = (_compiled_for_an_h100(b, shapes, ct_shapes) for b in (separate, one_op))
    assert "bn_relu_matmul_bn_add_matmul_bn_relu" in one_op_hlo and "matmul_moments" not in one_op_hlo
    assert "matmul_moments" in separate_hlo
    z_bytes = 32 * 28 * 28 * n * 2
    assert _traffic(one_op_hlo) < _traffic(separate_hlo) - 3.5 * z_bytes


def test_compiled_for_an_h100_the_convolution_sums_the_statistics_and_its_backward_stays_cudnn():
    """conv1 -> bn1 + ReLU as the model runs it on a GPU (cuDNN's convolution, the statistics
    kernel, the Pallas BatchNorm) and with ``conv1x1_moments``: the forward convolution becomes
    the Triton kernel, its backward stays cuDNN's (filter and input gradients), and the step
    reads z once less (the statistics' pass), less the partial sums."""
    require_cuda_plugin()
    shape, n, dtype = (32, 28, 28, 256), 64, jnp.bfloat16

    def model_block(x, kernel, scale, bias):
        z = jax.lax.conv_general_dilated(x, kernel.astype(dtype), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mean, mean_sq = pallas_batch_norm.batch_moments(z.astype(jnp.float32).reshape(-1, n), dtype)
        return (pallas_batch_norm.bn_relu_apply(z, mean, mean_sq - mean * mean, scale, bias, EPS, dtype),)

    def fused_block(x, kernel, scale, bias):
        z, (mean, mean_sq) = conv1x1_moments(x, kernel, dtype)
        return (pallas_batch_norm.bn_relu_apply(z, mean, mean_sq - mean * mean, scale, bias, EPS, dtype),)

    shapes = [(shape, dtype), ((1, 1, shape[-1], n), jnp.float32), ((n,), jnp.float32), ((n,), jnp.float32)]
    ct_shapes = [((*shape[:-1], n), dtype)]
    model_hlo, fused_hlo = (_compiled_for_an_h100(b, shapes, ct_shapes) for b in (model_block, fused_block))
    assert "matmul_moments" in fused_hlo and "bn_relu_matmul_moments" not in fused_hlo
    # (a 1x1 convolution's input gradient is a cuDNN forward convolution by the transposed kernel)
    assert _cudnn_calls(model_hlo, backward=False) == ["__cudnn$convForward"]
    assert _cudnn_calls(fused_hlo, backward=False) == []
    assert _cudnn_calls(fused_hlo, backward=True) == _cudnn_calls(model_hlo, backward=True)
    assert len(_cudnn_calls(fused_hlo, backward=True)) == 2
    z_bytes = 32 * 28 * 28 * n * 2
    assert _traffic(fused_hlo) < _traffic(model_hlo) - 0.8 * z_bytes


@pytest.mark.parametrize("strides", [1, 2])
def test_compiled_for_an_h100_the_shortcut_is_three_gemms_of_ours_and_its_batch_norm_gradient_is_never_stored(
        strides):
    """A projection shortcut added to a residual branch and ReLU'd (stride 1: ResNet-50's first
    block; stride 2: the first block of its later stages): as the model runs it on a GPU
    (cuDNN's convolution, the statistics kernel, XLA's BatchNorm) and as change 13's op, which
    ``layers.Shortcut`` gives every s-th pixel of x for stride s. The op's forward GEMM sums the
    statistics as it stores z, and its two backward GEMMs compute the BatchNorm's input
    gradient as they load g and z; no cuDNN call is left. What goes: the statistics' read of z
    (1 unit of z), XLA's pass that wrote dz and the GEMMs' reads of it (3 units), for g and z
    read by both GEMMs instead (2 more): 2 units by that count, measured 3.5 at stride 1, where
    XLA also folds g's sums into the pass that makes g. (In the whole ResNet-50 step it keeps
    them apart: 1.8 units.) At stride 2 the subsampled x is written and read, and its gradient
    padded back to x's shape by XLA, where cuDNN's strided convolutions read x and wrote its
    gradient themselves: measured 4.0 units less all the same."""
    require_cuda_plugin()
    shape, n, dtype = (32, 56, 56, 64), 256, jnp.bfloat16
    out_shape = (shape[0], shape[1] // strides, shape[2] // strides, n)

    def model_block(x, kernel, scale, bias, residual):
        z = jax.lax.conv_general_dilated(x, kernel.astype(dtype), (strides, strides), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mean, mean_sq = pallas_batch_norm.batch_moments(z.astype(jnp.float32).reshape(-1, n), dtype)
        u = ((z.astype(jnp.float32) - mean) * jax.lax.rsqrt(mean_sq - mean * mean + EPS) * scale + bias).astype(dtype)
        return (jax.nn.relu(u + residual),)

    def fused_block(x, kernel, scale, bias, residual):
        u, _, _ = conv1x1_bn(x[:, ::strides, ::strides, :], kernel, scale, bias, EPS, dtype)
        return (jax.nn.relu(u + residual),)

    shapes = [(shape, dtype), ((1, 1, shape[-1], n), jnp.float32), ((n,), jnp.float32), ((n,), jnp.float32),
              (out_shape, dtype)]
    ct_shapes = [(out_shape, dtype)]
    model_hlo, fused_hlo = (_compiled_for_an_h100(b, shapes, ct_shapes) for b in (model_block, fused_block))
    for kernel in ("matmul_moments", "affine_grad_matmul", "matmul_weight_grad_affine"):
        assert kernel in fused_hlo, kernel
    assert "bn_relu_" not in fused_hlo  # no BatchNorm + ReLU prologue: x is the convolution's input as it is
    assert len(_cudnn_calls(model_hlo, backward=False)) == 1 and len(_cudnn_calls(model_hlo, backward=True)) == 2
    assert _cudnn_calls(fused_hlo, backward=False) == _cudnn_calls(fused_hlo, backward=True) == []
    z_bytes = math.prod(out_shape) * 2
    assert _traffic(fused_hlo) < _traffic(model_hlo) - 3 * z_bytes
    # change 15: the BatchNorm's gradient without z (its sums from y^T g, z's terms through
    # y^T y and x @ (w diag(s) w^T)): measured 4.3 (stride 1) and 4.25 (stride 2) units less
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pallas_fused_conv, "GRAM_BACKWARD", True)
        gram_hlo = _compiled_for_an_h100(fused_block, shapes, ct_shapes)
    assert '"gram_grad_matmul"' in gram_hlo and '"gram"' in gram_hlo and "affine" not in gram_hlo
    assert _traffic(gram_hlo) < _traffic(fused_hlo) - 3.5 * z_bytes


def _net_step(monkeypatch, fused, kernels, dtype=jnp.float32, model_name="resnet50"):
    """Loss, gradients and new batch statistics of one training step of a narrow ResNet (16
    channels: the narrowest the kernels take), with the fused paths ``fused`` (a subset of
    ``conv3``: bn2 + ReLU + conv3, ``blocks.FUSE_BN2_CONV3``; ``conv1``: conv1 with bn1's
    statistics, ``blocks.FUSE_CONV1_BN1``; ``bn3``: with ``conv3``, bn3 in the same op,
    ``blocks.FUSE_BN3``; ``shortcut``: the projection shortcut as one op,
    ``layers.FUSE_SHORTCUT``; ``gram``: those ops' BatchNorm gradient without z,
    ``pallas_fused_conv.GRAM_BACKWARD``; ``residual``: bn3, the add and ReLU in conv3's op,
    ``blocks.FUSE_RESIDUAL``; ``projection``: the projection shortcut in that op too,
    ``blocks.FUSE_PROJECTION``; ``stem``: the stem's BatchNorm, pool and ReLU as one op,
    ``layers.FUSE_STEM_POOL``), and the CPU's layers (``default``) or the GPU kernels under the
    interpreter (``cuda``). ``model_name``: ResNet-50 (a stride-1 projection in its first
    stage, stride 2 in the others), ResNet-50-D (every stage's projection after an average
    pool, stride 1) or ResNet-18 (basic blocks: stride-2 projections only)."""
    from resnet_jax.models import blocks, create_model, layers
    from tests.conftest import use_cuda_kernels

    with monkeypatch.context() as patch:
        if kernels == "cuda":
            use_cuda_kernels(patch, fused_conv="conv3" in fused, fused_conv1="conv1" in fused,
                             fused_bn3="bn3" in fused, input_grad_sums="sums" in fused,
                             fused_shortcut="shortcut" in fused, gram_backward="gram" in fused,
                             fused_residual="residual" in fused, fused_projection="projection" in fused,
                             fused_stem="stem" in fused)
        else:
            patch.setattr(blocks, "FUSE_PROJECTION", "projection" in fused)
            patch.setattr(blocks, "FUSE_BN2_CONV3", "conv3" in fused)
            patch.setattr(blocks, "FUSE_CONV1_BN1", "conv1" in fused)
            patch.setattr(blocks, "FUSE_BN3", "bn3" in fused)
            patch.setattr(blocks, "FUSE_RESIDUAL", "residual" in fused)
            patch.setattr(layers, "FUSE_SHORTCUT", "shortcut" in fused)
            patch.setattr(layers, "FUSE_STEM_POOL", "stem" in fused)
        model = create_model(model_name, widths=(16, 16, 16, 16), stem_width=16, num_classes=5, dtype=dtype)
        x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
        labels = jnp.arange(4) % 5
        variables = model.init(jax.random.key(1), x, train=True)

        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])
            onehot = jax.nn.one_hot(labels, 5)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return variables, value, grads, updates["batch_stats"]


@pytest.mark.slow
@pytest.mark.parametrize("kernels,fused,model_name", [
    *((kernels, fused, "resnet50") for fused in [("conv3",), ("conv1",), ("conv3", "bn3"), ("conv3", "bn3", "sums"),
                                                 ("shortcut",)]
      for kernels in ("default", "cuda") if kernels == "cuda" or "sums" not in fused),  # change 12: GPU kernels only
    ("cuda", ("shortcut",), "resnet50d"),
    *((kernels, ("shortcut",), "resnet18") for kernels in ("default", "cuda")),
    # change 15, GPU kernels only
    ("cuda", ("conv3", "bn3", "sums", "shortcut", "gram"), "resnet50"), ("cuda", ("shortcut", "gram"), "resnet18"),
    # change 16: on the CPU's layers, and the GPU kernels with every other change
    *((kernels, ("conv3", "bn3", "residual"), "resnet50") for kernels in ("default", "cuda")),
    ("cuda", ("conv3", "bn3", "sums", "conv1", "shortcut", "gram", "residual"), "resnet50"),
    # change 17: on the CPU's layers and the GPU kernels, ResNet-50-D's avg_down shortcut too, and with every change
    *((kernels, ("conv3", "bn3", "residual", "projection"), "resnet50") for kernels in ("default", "cuda")),
    ("cuda", ("conv3", "bn3", "residual", "projection"), "resnet50d"),
    ("cuda", ("conv3", "bn3", "sums", "conv1", "shortcut", "gram", "residual", "projection"), "resnet50"),
    # change 22: the stem's BatchNorm, pool and ReLU as one op, alone (after ResNet-D's deep stem
    # too) and with every other change
    *((kernels, ("stem",), "resnet50") for kernels in ("default", "cuda")), ("cuda", ("stem",), "resnet50d"),
    ("cuda", ("conv3", "bn3", "sums", "conv1", "shortcut", "gram", "residual", "projection", "stem"), "resnet50"),
], ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_a_network_trains_the_same_with_the_fused_path(monkeypatch, kernels, fused, model_name):
    """Each candidate changes no parameter (names, shapes, initial values) and no number: with it,
    a training step's loss, every gradient and the new running statistics equal the model's
    without it, in float32, on the CPU's layers and with the GPU kernels under the interpreter
    (``sums`` and ``gram``, changes 12 and 15, exist in the GPU kernels only). Each gradient and
    statistic within 1e-4 of its largest element: the model's own float32 spread, its CPU layers
    against its GPU kernels, reaches 6.8e-5 on ResNet-50-D (measured; 5.4e-5 with change 17)."""
    plain = _net_step(monkeypatch, (), kernels, model_name=model_name)
    fused = _net_step(monkeypatch, fused, kernels, model_name=model_name)
    chex.assert_trees_all_equal(plain[0], fused[0])  # same variables at init
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(fused[2:]), jax.tree.leaves(plain[2:])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=max(1e-5, 1e-4 * float(jnp.max(jnp.abs(want)))))


@pytest.mark.parametrize("spec", ["data", ("data", "model")])
@pytest.mark.parametrize("op", ["bn_relu_conv1x1", "conv1x1_moments", "bn_relu_conv1x1_bn",
                                "bn_relu_conv1x1_bn+input_grad_sums", "bn_relu_conv1x1_bn+input_grad_sums+gram",
                                "conv1x1_bn", "conv1x1_bn+gram", "bn_relu_conv1x1_bn_add_relu",
                                "bn_relu_conv1x1_bn_add_conv1x1_bn_relu"])
def test_with_the_batch_split_over_devices_each_runs_its_rows_and_nothing_is_gathered(small_blocks, monkeypatch,
                                                                                      spec, op):
    """x split by examples over 4 or all 8 test devices: the loss and every gradient equal the
    textbook layers' on one device (float32), and no device gathers x or z: each kernel runs on
    its own rows, and only the statistics and the weight gradient are all-reduced."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    op, *options = op.split("+")
    monkeypatch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", "input_grad_sums" in options)
    monkeypatch.setattr(pallas_fused_conv, "GRAM_BACKWARD", "gram" in options)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    x, scale, bias, kernel, ct_z, ct_sums = _block_operands((16, 4, 4, 32), 64, seed=6)
    fused, reference, args, names = {
        "bn_relu_conv1x1": (_fused, _reference, (x, scale, bias, kernel), ("x", "scale", "bias", "kernel")),
        "conv1x1_moments": (_conv_fused, _conv_reference, (x, kernel), ("x", "kernel")),
        "bn_relu_conv1x1_bn": (_fused_bn3, _reference_bn3, _bn3_operands((16, 4, 4, 32), 64, seed=6)[0], NAMES_BN3),
        "conv1x1_bn": (_fused_conv_bn, _reference_conv_bn, _conv_bn_operands((16, 4, 4, 32), 64, seed=6)[0],
                       ("x", "kernel", "scale", "bias")),
        "bn_relu_conv1x1_bn_add_relu": (_fused_tail, _reference_tail, _tail_operands((16, 4, 4, 32), 64, seed=6)[0],
                                        NAMES_TAIL),
        "bn_relu_conv1x1_bn_add_conv1x1_bn_relu": (
            _fused_projection_tail, _reference_projection_tail,
            _projection_tail_operands((16, 4, 4, 32), 64, 16, seed=6)[0], NAMES_PROJECTION_TAIL),
    }[op]
    if op == "bn_relu_conv1x1_bn_add_conv1x1_bn_relu":
        ct_sums = jnp.concatenate([ct_sums, ct_sums])
    by_rows = NamedSharding(mesh, PartitionSpec(spec))
    sharded = (jax.device_put(args[0], by_rows), *args[1:])
    if op == "bn_relu_conv1x1_bn_add_relu":  # the residual is split by examples too
        sharded = (*sharded[:-1], jax.device_put(args[-1], by_rows))
    if op == "bn_relu_conv1x1_bn_add_conv1x1_bn_relu":  # and the shortcut's input
        sharded = (*sharded[:6], jax.device_put(args[6], by_rows), *sharded[7:])

    def loss(fn, *args):
        z, moments = fn(*args, jnp.float32)
        return jnp.sum(z * ct_z) + jnp.sum(moments * ct_sums)

    argnums = tuple(range(len(args)))
    step = jax.jit(jax.value_and_grad(functools.partial(loss, fused), argnums=argnums))
    value, grads = step(*sharded)
    want_value, want = jax.value_and_grad(functools.partial(loss, reference), argnums=argnums)(*args)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for name, g, w in zip(names, grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))), err_msg=name)
    hlo = step.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo


class _Layers(nn.Module):
    """conv1 -> bn1 + ReLU -> bn2 + ReLU -> conv3 -> bn3, plus a projection (a 1x1 conv -> BatchNorm
    of x), ReLU'd, as separate layers or through BatchNorm's fusion keywords
    (``input_conv1x1_kernel`` with and without an activation, ``conv1x1_kernel`` + ``next_norm``
    + ``residual``; ``fused="projection"``: the projection given unapplied, a
    ``layers.ShortcutProjection``, as change 17's blocks give it)."""

    fused: bool | str

    @nn.compact
    def __call__(self, x, train):
        from resnet_jax.models import layers

        if self.fused:
            k1 = layers.Conv1x1Kernel(32, name="conv1")(x.shape[-1])
            y = layers.BatchNorm(name="bn1", activation=jax.nn.relu)(x, train, input_conv1x1_kernel=k1)
            k3 = layers.Conv1x1Kernel(64, name="conv3")(32)
            bn3 = layers.BatchNorm(name="bn3")
            kp = layers.Conv1x1Kernel(64, name="projection")(x.shape[-1])
            if self.fused == "projection":
                projection = layers.ShortcutProjection(x, kp, layers.BatchNorm(name="projection_bn"))
            else:
                projection = layers.BatchNorm(name="projection_bn")(x, train, input_conv1x1_kernel=kp)
            return layers.BatchNorm(name="bn2", activation=jax.nn.relu)(y, train, conv1x1_kernel=k3, next_norm=bn3,
                                                                        residual=projection)
        y = layers.conv(32, 1, name="conv1")(x)
        y = layers.BatchNorm(name="bn1", activation=jax.nn.relu)(y, train)
        y = layers.BatchNorm(name="bn2", activation=jax.nn.relu)(y, train)
        y = layers.BatchNorm(name="bn3")(layers.conv(64, 1, name="conv3")(y), train)
        return jax.nn.relu(y + layers.BatchNorm(name="projection_bn")(layers.conv(64, 1, name="projection")(x), train))


def test_batch_norm_fusion_keywords_give_the_separate_layers_results_in_training_and_evaluation():
    """The same parameters, outputs, gradients and running statistics as the layers one after
    another (the CPU's paths; the kernels' are the tests above), in training and in evaluation;
    combinations that cannot work are refused with a message that says so."""
    from resnet_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16))
    plain = _Layers(False)
    variables = plain.init(jax.random.key(1), x, True)

    def train(model, params):
        out, updates = model.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(out * jnp.cos(out)), (out, updates)

    (_, (want, want_stats)), want_grads = jax.value_and_grad(functools.partial(train, plain), has_aux=True)(
        variables["params"])
    for fused in (_Layers(True), _Layers("projection")):
        chex.assert_trees_all_equal(variables, fused.init(jax.random.key(1), x, True))
        (_, (got, got_stats)), got_grads = jax.value_and_grad(functools.partial(train, fused), has_aux=True)(
            variables["params"])
        for g, w in zip(jax.tree.leaves((got, got_stats, got_grads)),
                        jax.tree.leaves((want, want_stats, want_grads)), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        evaluated = {**variables, **want_stats}
        np.testing.assert_allclose(fused.apply(evaluated, x, False), plain.apply(evaluated, x, False), rtol=1e-5,
                                   atol=1e-6)

    norm = layers.BatchNorm()
    with pytest.raises(ValueError, match="cannot be combined"):
        norm.init(jax.random.key(0), x, True, statistics=(jnp.zeros(8), jnp.ones(8)),
                  input_conv1x1_kernel=jnp.ones((1, 1, 16, 8)))
    with pytest.raises(ValueError, match="train=True"):
        norm.init(jax.random.key(0), None, False, computed_by=(8, lambda s, b, e: None))
    with pytest.raises(ValueError, match="residual= is added after next_norm"):
        norm.init(jax.random.key(0), x, True, residual=x)
