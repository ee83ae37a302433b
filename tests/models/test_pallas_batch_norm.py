"""The Pallas BatchNorm kernels (``resnet_jax.models.pallas_batch_norm``, the model's BatchNorm on a
GPU) compute the textbook function and derivatives. References: float64 NumPy for the kernel's sums, torch's
``batch_norm(training=True)`` + ``relu`` under autograd for values and reverse-mode
derivatives, and the textbook formula under plain JAX autodiff for forward mode. On CPU the
kernel runs under the Pallas interpreter (the same kernel body the GPU compiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.models import pallas_batch_norm as pbn


def _sums_float64(x, dy, mean, a, b):
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    centred = x - np.asarray(mean, np.float64)
    g = np.where(centred * np.asarray(a, np.float64) + np.asarray(b, np.float64) > 0, dy, 0.0)
    return g.sum(0), (g * centred).sum(0)


@pytest.mark.parametrize("rows, channels", [(192, 96), (6, 8), (128, 3)])
def test_the_kernel_sums_equal_float64(rows, channels):
    """Several row and channel blocks (192 x 96: 3 x 3 blocks of 64 x 32), and the shapes the
    kernel leaves to XLA (fewer than 8 rows or channels per block)."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (rows, channels)) * 2 + 0.5
    dy = jax.random.normal(keys[1], (rows, channels))
    mean, a, b = (jax.random.normal(k, (channels,)) for k in keys[2:])
    got = pbn.relu_grad_sums(x, dy, mean, a, b, block_rows=64, block_channels=32, interpret=True)
    for g, want in zip(got, _sums_float64(x, dy, mean, a, b)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, channels", [(192, 96), (6, 8)])
def test_the_moments_kernel_sums_equal_float64(rows, channels):
    """sum(x) and sum(x * x) per channel, over 3 x 3 blocks and on a shape left to XLA."""
    x = jax.random.normal(jax.random.key(5), (rows, channels)) * 3 + 1.5
    got = pbn.moment_sums(x, block_rows=64, block_channels=32, interpret=True)
    x64 = np.asarray(x, np.float64)
    for g, want in zip(got, (x64.sum(0), (x64 * x64).sum(0))):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("spec", [("data", None), (None, None), (("data", "model"), None)])
def test_row_sharded_sums_add_each_devices_rows_without_gathering_them(spec):
    """With x and dy split by rows over the 8 test devices (or over two mesh axes, or not at
    all), each device sums its own rows and one all-reduce adds them: the result equals the
    float64 sums, and no device gathers the whole of x."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (8 * 64, 24)) + 0.2
    dy = jax.random.normal(keys[1], x.shape)
    mean, a, b = (jax.random.normal(k, (24,)) for k in keys[2:])
    rows = NamedSharding(mesh, PartitionSpec(*spec))
    x_sharded, dy_sharded = jax.device_put(x, rows), jax.device_put(dy, rows)
    fn = jax.jit(pbn._GRAD_SUMS[True])  # the kernel under the interpreter
    got = fn(x_sharded, dy_sharded, mean, a, b)
    hlo = fn.lower(x_sharded, dy_sharded, mean, a, b).compile().as_text()
    for g, want in zip(got, _sums_float64(x, dy, mean, a, b)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-4)
    assert "all-gather" not in hlo
    assert ("all-reduce" in hlo) == (spec[0] is not None)
    # the forward statistics' kernel the same way
    fn = jax.jit(lambda x: pbn.batch_moments(x, jnp.float32, True))
    mean, mean_sq = fn(x_sharded)
    hlo = fn.lower(x_sharded).compile().as_text()
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(mean), x64.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mean_sq), (x64 * x64).mean(0), rtol=1e-5, atol=1e-6)
    assert "all-gather" not in hlo
    assert ("all-reduce" in hlo) == (spec[0] is not None)


def _textbook(x, scale, bias, epsilon=1e-5):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias)


def _candidate(x, scale, bias, activation=jax.nn.relu, kernel_statistics=False):
    """The model's GPU BatchNorm, its kernels under the interpreter."""
    return pbn.batch_norm_train(x, scale, bias, 1e-5, jnp.float32, activation, kernel_statistics=kernel_statistics,
                                interpret=True)[0]


@pytest.fixture
def inputs():
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (4, 6, 6, 16)) * 1.5 + 0.7
    scale = 1 + 0.5 * jax.random.normal(keys[1], (16,))
    bias = 0.5 * jax.random.normal(keys[2], (16,))
    ct = jax.random.normal(keys[3], x.shape)
    return x, scale, bias, ct


def _assert_equals_torch(inputs, candidate, relu: bool = True) -> None:
    """Values and x, scale, bias gradients of ``candidate`` (the kernels under the
    interpreter) against torch's ``batch_norm(training=True)`` (+ ``relu``) under autograd."""
    torch = pytest.importorskip("torch")
    x, scale, bias, ct = inputs
    y, pullback = jax.vjp(candidate, x, scale, bias)
    dx, dscale, dbias = pullback(ct)
    x_t = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_()
    scale_t = torch.tensor(np.asarray(scale)).requires_grad_()
    bias_t = torch.tensor(np.asarray(bias)).requires_grad_()
    y_t = torch.nn.functional.batch_norm(x_t, None, None, scale_t, bias_t, training=True, eps=1e-5)
    y_t = torch.relu(y_t) if relu else y_t
    y_t.backward(torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2))
    close = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), y_t.detach().permute(0, 2, 3, 1).numpy(), **close)
    np.testing.assert_allclose(np.asarray(dx), x_t.grad.permute(0, 2, 3, 1).numpy(), **close)
    np.testing.assert_allclose(np.asarray(dscale), scale_t.grad.numpy(), **close)
    np.testing.assert_allclose(np.asarray(dbias), bias_t.grad.numpy(), **close)


def test_values_and_gradients_equal_torch_batch_norm_relu(inputs):
    _assert_equals_torch(inputs, _candidate)


@pytest.mark.parametrize("activation", ["relu", None])
def test_with_the_pallas_statistics_values_and_gradients_equal_torch(inputs, activation):
    """The statistics from the moments kernel (its derivative written out),
    with the ReLU candidate and with no activation (a BatchNorm before a residual add):
    values and reverse-mode derivatives against torch, forward mode against the textbook."""
    x, scale, bias, ct = inputs
    act = jax.nn.relu if activation else None

    def candidate(x, scale, bias):
        return _candidate(x, scale, bias, act, kernel_statistics=True)

    _assert_equals_torch(inputs, candidate, relu=activation is not None)
    _, tangent = jax.jvp(candidate, (x, scale, bias), (ct, jnp.sin(jnp.arange(16.0)), jnp.zeros(16)))

    def textbook(x, scale, bias):
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return jax.nn.relu(y) if activation else y

    _, want = jax.jvp(textbook, (x, scale, bias), (ct, jnp.sin(jnp.arange(16.0)), jnp.zeros(16)))
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_forward_mode_equals_the_textbook_derivative(inputs):
    """jax.jvp goes through the hand-written derivative (linear_call), with a tangent for the
    input only (the others symbolic zeros) and for every argument."""
    x, scale, bias, ct = inputs
    dscale, dbias = jnp.sin(jnp.arange(16.0)), jnp.cos(jnp.arange(16.0))
    for primals, tangents in (((x, scale, bias), (ct, jnp.zeros(16), jnp.zeros(16))),
                              ((x, scale, bias), (ct, dscale, dbias))):
        want = jax.jvp(_textbook, primals, tangents)
        got = jax.jvp(_candidate, primals, tangents)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    _, got = jax.jvp(lambda x: _candidate(x, scale, bias), (x,), (ct,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jvp(lambda x: _textbook(x, scale, bias), (x,), (ct,))[1]),
                               rtol=1e-4, atol=1e-5)


def test_bf16_output_and_gradient_dtypes(inputs):
    x, scale, bias, ct = inputs
    x, ct = x.astype(jnp.bfloat16), ct.astype(jnp.bfloat16)
    y, pullback = jax.vjp(lambda x, s, b: pbn.batch_norm_train(x, s, b, 1e-5, jnp.bfloat16, jax.nn.relu,
                                                               interpret=True)[0], x, scale, bias)
    dx, dscale, dbias = pullback(ct)
    assert (y.dtype, dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32)
    want = jax.grad(lambda x: jnp.sum(_textbook(x, scale, bias) * ct.astype(jnp.float32)))(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)
