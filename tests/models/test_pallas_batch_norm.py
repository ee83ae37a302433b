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


# ---------------------------------------------------------------- BatchNorm + max pool + ReLU (the stem)
def _stem_inputs(shape, seed=2, integers=False):
    keys = jax.random.split(jax.random.key(seed), 4)
    if integers:  # few distinct values: windows with tied maxima, outputs the ReLU zeroes
        x = jax.random.randint(keys[0], shape, -2, 3).astype(jnp.float32)
    else:
        x = jax.random.normal(keys[0], shape) * 1.5 + 0.7
    scale = 1 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = 0.5 * jax.random.normal(keys[2], shape[-1:])
    ct = jax.random.normal(keys[3], (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    return x, scale, bias, ct


def _stem_fused(x, scale, bias):
    return pbn.bn_pool_relu_train(x, scale, bias, 1e-5, jnp.float32, True)


def _stem_textbook(x, scale, bias):
    """BatchNorm (biased batch variance), flax's max pool (XLA's select-and-scatter derivative), ReLU."""
    from flax import linen as nn

    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return jax.nn.relu(nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))), mean, var


# (2, 6, 8, 16): 3 pooled rows an image, kernel instances of 2 rows that straddle two images;
# (3, 10, 6, 32): pooled rows of 3 (a 4-wide tile, its last column masked); (2, 8, 8, 64): two
# channel blocks
@pytest.mark.parametrize("shape", [(2, 6, 8, 16), (3, 10, 6, 32), (2, 8, 8, 64)])
def test_the_fused_stem_equals_torch_batch_norm_max_pool_relu(shape):
    """Values, the returned statistics and the x, scale, bias gradients of the op (its kernels
    under the interpreter) against torch's batch_norm(training=True), max_pool2d(3, 2, 1) and
    relu under autograd."""
    torch = pytest.importorskip("torch")
    x, scale, bias, ct = _stem_inputs(shape)
    (out, mean, var), pullback = jax.vjp(_stem_fused, x, scale, bias)
    dx, dscale, dbias = pullback((ct, jnp.zeros_like(mean), jnp.zeros_like(var)))
    x_t = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_()
    scale_t = torch.tensor(np.asarray(scale)).requires_grad_()
    bias_t = torch.tensor(np.asarray(bias)).requires_grad_()
    y_t = torch.nn.functional.batch_norm(x_t, None, None, scale_t, bias_t, training=True, eps=1e-5)
    out_t = torch.relu(torch.nn.functional.max_pool2d(y_t, 3, 2, 1))
    out_t.backward(torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2))
    close = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), out_t.detach().permute(0, 2, 3, 1).numpy(), **close)
    np.testing.assert_allclose(np.asarray(mean), x_t.detach().mean((0, 2, 3)).numpy(), **close)
    np.testing.assert_allclose(np.asarray(var), x_t.detach().var((0, 2, 3), unbiased=False).numpy(), **close)
    np.testing.assert_allclose(np.asarray(dx), x_t.grad.permute(0, 2, 3, 1).numpy(), **close)
    np.testing.assert_allclose(np.asarray(dscale), scale_t.grad.numpy(), **close)
    np.testing.assert_allclose(np.asarray(dbias), bias_t.grad.numpy(), **close)


def test_the_fused_stem_sends_tied_maxima_to_the_first_and_differentiates_its_statistics():
    """Inputs of five values, so windows tie and the ReLU zeroes outputs: the gradient goes to
    the first maximum of each window as XLA's select-and-scatter sends it, and cotangents on
    the returned mean and variance reach x as through the textbook formula under autodiff."""
    x, scale, bias, ct = _stem_inputs((2, 8, 12, 16), seed=3, integers=True)
    c_mean, c_var = jnp.sin(jnp.arange(16.0)), jnp.cos(jnp.arange(16.0))

    def loss(fn):
        def value(x, scale, bias):
            out, mean, var = fn(x, scale, bias)
            return jnp.sum(out * ct) + jnp.sum(mean * c_mean) + jnp.sum(var * c_var)
        return value

    assert int(jnp.sum(_stem_textbook(x, scale, bias)[0] == 0)) > 0
    got = jax.grad(loss(_stem_fused), (0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(_stem_textbook), (0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_the_fused_stem_forward_mode_equals_the_textbook_derivative():
    x, scale, bias, _ = _stem_inputs((2, 6, 8, 16))
    tangents = (jnp.cos(x), jnp.sin(jnp.arange(16.0)), jnp.cos(jnp.arange(16.0)))
    for t in (tangents, (tangents[0], jnp.zeros(16), jnp.zeros(16))):
        got = jax.jvp(_stem_fused, (x, scale, bias), t)
        want = jax.jvp(_stem_textbook, (x, scale, bias), t)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_the_stem_batch_norm_takes_the_fused_op_for_its_pool_and_relu_in_bf16():
    """``batch_norm_train(activation=layers.max_pool_relu)`` runs the op where the shape allows
    (the same bf16 output as the BatchNorm, then the pool and ReLU; its gradients summed in
    float32, so within bf16 rounding of the layers one after another), and the layers where it
    does not (an odd height)."""
    from resnet_jax.models import layers

    x, scale, bias, ct = _stem_inputs((2, 8, 12, 16))
    x, ct = x.astype(jnp.bfloat16), ct.astype(jnp.bfloat16)

    def fused(x, scale, bias):
        return pbn.batch_norm_train(x, scale, bias, 1e-5, jnp.bfloat16, layers.max_pool_relu, interpret=True)

    def layered(x, scale, bias):
        y, mean, var = pbn.batch_norm_train(x, scale, bias, 1e-5, jnp.bfloat16, None, interpret=True)
        return jax.nn.relu(layers._max_pool(y)), mean, var

    def backward_jaxpr(x):
        def backward(x, scale, bias):
            out, pullback = jax.vjp(lambda x: fused(x, scale, bias)[0], x)
            return pullback(jnp.ones_like(out))
        return str(jax.make_jaxpr(backward)(x, scale, bias))

    assert "batch_norm_pool_relu_grad_x" in backward_jaxpr(x)
    (out, mean, var), pullback = jax.vjp(fused, x, scale, bias)
    (out_l, mean_l, var_l), pullback_l = jax.vjp(layered, x, scale, bias)
    assert out.dtype == jnp.bfloat16 and mean.shape == var.shape == (1, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_l))
    np.testing.assert_allclose(np.asarray(mean), np.asarray(mean_l), rtol=1e-6)
    zeros = (jnp.zeros_like(mean), jnp.zeros_like(var))
    dx, dscale, dbias = pullback((ct, *zeros))
    dx_l, dscale_l, dbias_l = pullback_l((ct, *zeros))
    assert dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_l, np.float32), rtol=0.05, atol=0.02)
    np.testing.assert_allclose(np.asarray(dscale), np.asarray(dscale_l), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(np.asarray(dbias), np.asarray(dbias_l), rtol=0.02, atol=0.02)
    assert not pbn.stem_pool_fusable((2, 7, 12, 16)) and not pbn.stem_pool_fusable((2, 8, 12, 12))
    assert "batch_norm_pool_relu_grad_x" not in backward_jaxpr(jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))))


def test_the_fused_stem_split_by_images_over_devices_equals_it_on_one_without_gathering():
    """With x split by images over 4 of the test devices, each runs the backward kernels on its
    own images and the sums are added by one all-reduce: the output, statistics and gradients
    equal the unsplit op's, and no device gathers x."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x, scale, bias, ct = _stem_inputs((4, 6, 8, 16), seed=5)

    def step(x, scale, bias, ct):
        (out, mean, var), pullback = jax.vjp(_stem_fused, x, scale, bias)
        return out, mean, var, pullback((ct, jnp.zeros_like(mean), jnp.zeros_like(var)))

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    images = NamedSharding(mesh, PartitionSpec("data"))
    args = (jax.device_put(x, images), scale, bias, jax.device_put(ct, images))
    fn = jax.jit(step)
    hlo = fn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    for got, want in zip(jax.tree.leaves(fn(*args)), jax.tree.leaves(jax.jit(step)(x, scale, bias, ct))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
