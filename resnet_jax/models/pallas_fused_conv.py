"""A BatchNorm + ReLU fused into the 1x1 convolution after it, in Pallas GPU kernels (a candidate).

In a bottleneck block, ``bn2`` + ReLU feeds ``conv3`` (1x1), whose output feeds ``bn3``. The
model runs that as four passes over memory: ``bn2``'s apply reads x and writes y, cuDNN's
convolution reads y and writes z, and ``bn3``'s statistics read z. :func:`bn_relu_conv1x1`
is the same function in one kernel (:func:`matmul_moments`): each instance loads a block of
x, applies the BatchNorm and ReLU in registers (the prologue), multiplies by the kernel on the
tensor cores, writes z and, from the same registers, the block's partial sums of z and z * z
(the epilogue). y is never stored and z is never read back: compiled for ResNet-50 at batch
256, 2 units of bn2's input and 1 of bn3's (4x as wide) less per block, ~4.2 GB of the
step's ~91 (docs/performance.md, "Change 9").

Reverse mode writes the same trick into the weight gradient (:func:`weight_grad`): y is
recomputed from x inside the kernel that sums ``y^T dz``, so the backward pass reads x where
the model reads y and stores nothing more. The input gradient ``dz @ kernel^T`` is XLA's
(cuBLAS), and the BatchNorm + ReLU's own backward is :mod:`pallas_batch_norm`'s, unchanged.

The function and its derivatives are the textbook ones; the tests compare values and
gradients with ``relu(batch_norm(x)) @ kernel`` written in plain JAX, and forward mode with
plain autodiff. Like :func:`pallas_batch_norm.bn_relu_apply` it is a ``custom_jvp`` whose
tangent map is a ``linear_call``: first-order forward and reverse mode work, second-order
derivatives through it do not.

Sharding: as the BatchNorm kernels, both kernels are ``custom_partitioning`` ops
(``pallas_batch_norm.row_sharded_op``): with the batch split over devices each runs on its
own rows, and the statistics and the weight gradient are added across devices (the
all-reduces data parallelism needs anyway); the kernel weights are replicated.

The model uses it where ``blocks.FUSE_BN2_CONV3`` is set (``layers.BatchNorm``'s
``conv1x1_kernel`` and ``statistics``). It is not the default: whether a Triton GEMM with a
prologue beats cuDNN's 1x1 convolution plus XLA's apply pass is a question for the device
(``benchmarks/fused_conv_pallas.py``).

:func:`conv1x1_moments` is the same forward kernel without the prologue: a 1x1 convolution
that sums its output's statistics as it stores it, for a BatchNorm that follows it (each
Bottleneck's conv1 -> bn1 where ``blocks.FUSE_CONV1_BN1`` is set, through ``layers.BatchNorm``'s
``input_conv1x1_kernel``; docs/performance.md, "Change 10"). Its derivative is the
convolution's own, so its backward pass is XLA's (cuDNN's) as for ``nn.Conv``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from resnet_jax.models.pallas_batch_norm import (
    _bn_relu_tangent,
    _bn_relu_transpose,
    _largest_power_of_two_divisor,
    present_tangents,
    relu_bn,
    row_sharded_op,
)

Array = jax.Array
Dtype = Any

# The forward kernel: rows (N*H*W positions) and output channels per instance, input channels
# per step of its loop, warps, and Triton's pipelining depth. Read at trace time.
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 2
# The weight-gradient kernel: input and output channels per instance, rows per step of its
# loop, warps, and the number of instances it aims for by splitting the rows (each split
# writes a float32 (K, N) partial sum, which XLA adds).
WGRAD_BLOCK_K, WGRAD_BLOCK_N, WGRAD_SUB_ROWS, WGRAD_NUM_WARPS, WGRAD_PROGRAMS = 64, 128, 32, 4, 528


# ---------------------------------------------------------------- the kernels
def _forward_kernel(*refs, block_k: int, prologue: bool) -> None:
    """One (rows, out channels) block: ``z = relu_bn(x) @ w`` (``prologue``; else ``x @ w``),
    accumulated in float32 over the input channels ``block_k`` at a time, stored in ``z``'s
    dtype; ``sums[0]`` and ``sums[1]`` are the column sums of the stored z and z * z, in
    float32. The refs are ``x, [mean, a, b,] w, z, sums``."""
    x_ref, *vector_refs, w_ref, z_ref, sums_ref = refs
    rows, cols = z_ref.shape

    def body(i: int, acc: Array) -> Array:
        ks = pl.ds(i * block_k, block_k)
        y = x_ref[:, ks]
        if prologue:
            mean_ref, a_ref, b_ref = vector_refs
            y = relu_bn(y, mean_ref[:, ks], a_ref[:, ks], b_ref[:, ks])
        return acc + jnp.dot(y.astype(w_ref.dtype), w_ref[ks, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros((rows, cols), jnp.float32))
    z = acc.astype(z_ref.dtype)
    z_ref[...] = z
    zf = z.astype(jnp.float32)
    sums_ref[0, :] = jnp.sum(zf, axis=0)
    sums_ref[1, :] = jnp.sum(zf * zf, axis=0)


def _wgrad_kernel(x_ref, mean_ref, a_ref, b_ref, dz_ref, dw_ref, *, rows: int, sub: int) -> None:
    """Instance (n, k, s): ``dw = relu_bn(x)^T @ dz`` over rows ``[s * rows, (s + 1) * rows)``,
    ``sub`` rows at a time, for one (input, output) channel block, in float32. The refs hold all
    rows of their channel block."""
    start = pl.program_id(2) * rows
    block_k, block_n = dw_ref.shape
    mean, a, b = mean_ref[...], a_ref[...], b_ref[...]

    def body(i: int, acc: Array) -> Array:
        rs = pl.ds(start + i * sub, sub)
        y = relu_bn(x_ref[rs, :], mean, a, b).astype(dz_ref.dtype)
        return acc + jax.lax.dot_general(y, dz_ref[rs, :], (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    dw_ref[...] = jax.lax.fori_loop(0, rows // sub, body, jnp.zeros((block_k, block_n), jnp.float32))


def _fits(*sizes: int) -> bool:
    """Triton's dot needs power-of-two blocks of at least 16 along each dimension."""
    return all(s >= 16 for s in sizes)


def matmul_moments(
    x: Array, mean: Array | None, a: Array | None, b: Array | None, w: Array, *, out_dtype: Dtype,
    interpret: bool = False, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> tuple[Array, Array] | None:
    """``z = relu((x - mean) * a + b) @ w`` in ``out_dtype`` and the float32 (2, N) column sums
    of z and z * z, in one Pallas (Triton) kernel. x is (M, K), w (K, N) in the compute dtype,
    ``mean``, ``a``, ``b`` float32 (K,), or all three None for ``z = x @ w`` (no BatchNorm
    before the product: :func:`conv1x1_moments`). Returns None where K is not a power of two
    (an instance loads all K channels of its rows) or the largest power-of-two blocks that
    divide M, N and K are smaller than 16 (the caller then uses XLA). Block parameters left
    None are the module's (``BLOCK_M`` etc.) at trace time. A GPU only, unless ``interpret``."""
    m, k = x.shape
    n = w.shape[1]
    prologue = mean is not None
    if prologue != (a is not None) or prologue != (b is not None):
        raise ValueError("matmul_moments: give mean, a and b together (the BatchNorm before the product), or none")
    bm = _largest_power_of_two_divisor(m, block_m or BLOCK_M)
    bn = _largest_power_of_two_divisor(n, block_n or BLOCK_N)
    bk = _largest_power_of_two_divisor(k, block_k or BLOCK_K)
    if not _fits(bm, bn, bk) or k & (k - 1):
        return None
    # The output-channel blocks are the grid's first (fastest-launched) dimension: the instances
    # that share a block of x run together, so x is read from memory once and the other
    # instances find it in L2 (the kernel, at most 2 MiB, stays there).
    grid = (n // bn, m // bm)
    vector = pl.BlockSpec((1, k), lambda j, i: (0, 0))
    vectors = [v.reshape(1, k) for v in (mean, a, b)] if prologue else []
    z, partial = pl.pallas_call(
        functools.partial(_forward_kernel, block_k=bk, prologue=prologue),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, k), lambda j, i: (i, 0)), *[vector] * len(vectors),
                  pl.BlockSpec((k, bn), lambda j, i: (0, j))],
        out_specs=[pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
                   pl.BlockSpec((None, 2, bn), lambda j, i: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((m // bm, 2, n), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        name="bn_relu_matmul_moments" if prologue else "matmul_moments",
    )(x, *vectors, w)
    return z, jnp.sum(partial, axis=0)


def _row_splits(m: int, sub: int, programs_per_split: int, target: int, most: int) -> int:
    """How many row ranges to split M rows into: the fewest that reaches ``target`` instances
    with ``programs_per_split`` each, among the divisors of ``m // sub`` (each range a whole
    number of ``sub``-row steps) up to ``most``; the largest of those if none reaches it."""
    steps = m // sub
    divisors = [d for d in range(1, min(steps, max(most, 1)) + 1) if steps % d == 0]
    for d in divisors:
        if d * programs_per_split >= target:
            return d
    return divisors[-1]


def weight_grad(
    x: Array, mean: Array, a: Array, b: Array, dz: Array, *, interpret: bool = False,
    block_k: int | None = None, block_n: int | None = None, sub_rows: int | None = None,
    num_warps: int | None = None, programs: int | None = None,
) -> Array | None:
    """``relu((x - mean) * a + b)^T @ dz``, float32 (K, N), for x (M, K) and dz (M, N) in the
    compute dtype, in one Pallas (Triton) kernel that recomputes the ReLU'd BatchNorm from x.
    The rows are split into ranges so that the kernel runs about ``programs`` instances, as
    long as their float32 (K, N) partial sums, which XLA adds, stay under an eighth of the
    bytes of x and dz. Returns None where the blocks would be
    smaller than 16 (the caller then uses XLA). A GPU only, unless ``interpret``."""
    m, k = x.shape
    n = dz.shape[1]
    bk = _largest_power_of_two_divisor(k, block_k or WGRAD_BLOCK_K)
    bn = _largest_power_of_two_divisor(n, block_n or WGRAD_BLOCK_N)
    sub = _largest_power_of_two_divisor(m, sub_rows or WGRAD_SUB_ROWS)
    if not _fits(bk, bn, sub):
        return None
    # each range writes a float32 (K, N) partial sum that XLA reads back: at most an eighth of
    # the bytes the kernel has to read anyway
    most = (x.size * x.dtype.itemsize + dz.size * dz.dtype.itemsize) // (8 * k * n * 4)
    splits = _row_splits(m, sub, (k // bk) * (n // bn), programs or WGRAD_PROGRAMS, most)
    # Row ranges are the grid's last (slowest-launched) dimension: the instances that read the
    # same rows of x and dz run together, so those rows come from memory once and from L2 after.
    grid = (n // bn, k // bk, splits)
    vector = pl.BlockSpec((1, bk), lambda j, i, s: (0, i))
    partial = pl.pallas_call(
        functools.partial(_wgrad_kernel, rows=m // splits, sub=sub),
        grid=grid,
        in_specs=[pl.BlockSpec((m, bk), lambda j, i, s: (0, i)), vector, vector, vector,
                  pl.BlockSpec((m, bn), lambda j, i, s: (0, j))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda j, i, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, k, n), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps or WGRAD_NUM_WARPS,
                                                                     num_stages=2),
        name="bn_relu_matmul_weight_grad",
    )(x, mean.reshape(1, k), a.reshape(1, k), b.reshape(1, k), dz)
    return jnp.sum(partial, axis=0)


# ---------------------------------------------------------------- XLA's versions (fallback)
def _matmul_moments_xla(x: Array, mean: Array | None, a: Array | None, b: Array | None, w: Array,
                        out_dtype: Dtype) -> tuple[Array, Array]:
    y = x if mean is None else relu_bn(x, mean, a, b)
    z = jnp.dot(y.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(out_dtype)
    zf = z.astype(jnp.float32)
    return z, jnp.stack([jnp.sum(zf, axis=0), jnp.sum(zf * zf, axis=0)])


def _weight_grad_xla(x: Array, mean: Array, a: Array, b: Array, dz: Array) -> Array:
    y = relu_bn(x, mean, a, b).astype(dz.dtype)
    return jax.lax.dot_general(y, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel_or_xla(kernel_fn, xla_fn, *args: Array) -> Any:
    """``kernel_fn(*args)``, or ``xla_fn(*args)`` where that returns None (shapes it does not take)."""
    out = kernel_fn(*args)
    return xla_fn(*args) if out is None else out


@functools.cache
def _sharded_forward(out_dtype: Dtype, interpret: bool, prologue: bool = True) -> Callable:
    """:func:`matmul_moments` (or XLA's where it declines) as a :func:`row_sharded_op`: x's rows
    split over the devices, z split the same way, the sums added across them; the vectors and
    the kernel replicated (data parallelism). ``prologue=False``: the op takes (x, w) only."""
    fn = functools.partial(_kernel_or_xla, functools.partial(matmul_moments, out_dtype=out_dtype, interpret=interpret),
                           functools.partial(_matmul_moments_xla, out_dtype=out_dtype))
    if prologue:
        return row_sharded_op(fn, (True, False, False, False, False), (True, False), "m k, k, k, k, k n -> m n, t n")
    return row_sharded_op(lambda x, w: fn(x, None, None, None, w), (True, False), (True, False), "m k, k n -> m n, t n")


@functools.cache
def _sharded_weight_grad(interpret: bool) -> Callable:
    """:func:`weight_grad` (or XLA's) as a :func:`row_sharded_op`: x's and dz's rows split over
    the devices, each device's (K, N) sum added across them."""
    fn = functools.partial(_kernel_or_xla, functools.partial(weight_grad, interpret=interpret), _weight_grad_xla)
    return row_sharded_op(fn, (True, False, False, False, True), (False,), "m k, k, k, k, m n -> k n", ("m",))


# ---------------------------------------------------------------- the differentiable op
def bn_relu_conv1x1(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                    epsilon: float, dtype: Dtype, interpret: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """``z = conv1x1(relu(BatchNorm(x)), kernel)``, and z's per-channel ``mean(z)`` and
    ``mean(z * z)`` over all positions (the next BatchNorm's statistics).

    x is (..., K) NHWC in the compute ``dtype``; ``mean`` and ``var`` the float32 (K,) batch
    statistics of x, ``scale`` and ``bias`` the BatchNorm's (K,); ``kernel`` is (K, N) or the
    convolution's (1, 1, K, N), cast to ``dtype`` like flax's ``Conv``. z is (..., N), stored in
    ``dtype`` and returned as its float32 view: the next BatchNorm normalises that view, and the
    moments' derivative meets its gradient there, so z's gradient is summed in float32 and
    rounded once (as in the model's BatchNorm, ``pallas_batch_norm.batch_moments``); XLA keeps
    only the stored z. The moments are float32 (N,), taken from z as stored, in the kernel
    that stores it. The
    kernels are compiled for an NVIDIA GPU; ``interpret=True`` runs them under the Pallas
    interpreter instead (as :func:`pallas_batch_norm.bn_relu_apply`, whose backward this
    reuses). Shapes the kernels do not take (fewer than 16 channels or rows in a block, input
    channels not a power of two) run in XLA."""
    z, sums = _bn_relu_conv1x1(x, mean, var, scale, bias, kernel, epsilon, dtype, interpret)
    zf = z.astype(jnp.float32)
    return zf, moments_from_sums(zf.reshape(-1, z.shape[-1]), sums)


@jax.custom_jvp
def moments_from_sums(zf: Array, sums: Array) -> tuple[Array, Array]:
    """``mean(zf)`` and ``mean(zf * zf)`` over the rows of ``zf`` (M, N), read from ``sums``, their
    float32 (2, N) row sums that a kernel computed with z. The derivative is that of the two
    means with respect to ``zf`` (``mean(t)``, ``mean(2 z t)``, as
    ``pallas_batch_norm.batch_moments``), so XLA fuses it into the next BatchNorm's backward
    pass as it does the model's; ``sums`` gets none."""
    return sums[0] / zf.shape[0], sums[1] / zf.shape[0]


@moments_from_sums.defjvp
def _moments_from_sums_jvp(primals: tuple, tangents: tuple) -> tuple:
    (zf, sums), (tf, _) = primals, tangents
    return moments_from_sums(zf, sums), (jnp.mean(tf, axis=0), jnp.mean(2 * zf * tf, axis=0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8))
def _bn_relu_conv1x1(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                     epsilon: float, dtype: Dtype, interpret: bool = False) -> tuple[Array, Array]:
    """z and the float32 (2, N) row sums of z and z * z, which carry no derivative of their own
    (:func:`moments_from_sums` gives the moments theirs)."""
    k = x.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    a = jax.lax.rsqrt(var + epsilon) * scale
    z, sums = _sharded_forward(jnp.dtype(dtype), interpret)(x.reshape(-1, k), mean, a, bias.astype(jnp.float32), w)
    return z.reshape(*x.shape[:-1], w.shape[1]), sums


def _bn_relu_conv1x1_jvp(epsilon: float, dtype: Dtype, interpret: bool, primals: tuple,
                         tangents: tuple) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    z, sums = _bn_relu_conv1x1(*primals, epsilon, dtype, interpret)
    present, linear = present_tangents(tangents)
    bn_present, kernel_present = present[:5], present[5]
    n_bn = sum(bn_present)

    def tangent(res: tuple, lin: tuple) -> Array:
        x, mean, var, scale, bias, kernel = res
        k = x.shape[-1]
        w = kernel.reshape(k, -1).astype(dtype)
        tz = jnp.zeros((*x.shape[:-1], w.shape[1]), jnp.float32)
        if n_bn:
            ty = _bn_relu_tangent(epsilon, dtype, bn_present, res[:5], lin[:n_bn])
            tz = tz + jnp.dot(ty, w, preferred_element_type=jnp.float32)
        if kernel_present:
            a = jax.lax.rsqrt(var + epsilon) * scale
            y = relu_bn(x, mean, a, bias).astype(dtype)
            tz = tz + jnp.dot(y, lin[-1].reshape(w.shape).astype(dtype), preferred_element_type=jnp.float32)
        return tz.astype(dtype)

    def transpose(res: tuple, dz: Array) -> tuple:
        x, mean, var, scale, bias, kernel = res
        k = x.shape[-1]
        w = kernel.reshape(k, -1).astype(dtype)
        out = []
        if n_bn:
            dy = jnp.dot(dz, w.T, preferred_element_type=jnp.float32).astype(dtype)
            out.extend(_bn_relu_transpose(epsilon, interpret, bn_present, res[:5], dy))
        if kernel_present:
            a = jax.lax.rsqrt(var + epsilon) * scale
            dw = _sharded_weight_grad(interpret)(x.reshape(-1, k), mean, a, bias.astype(jnp.float32),
                                                 dz.reshape(-1, w.shape[1]))
            out.append(dw.reshape(kernel.shape).astype(kernel.dtype))
        return tuple(out)

    tz = jax.custom_derivatives.linear_call(tangent, transpose, primals, linear)
    return (z, sums), (tz, jnp.zeros_like(sums))


_bn_relu_conv1x1.defjvp(_bn_relu_conv1x1_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------- a 1x1 convolution and its statistics
def conv1x1_moments(x: Array, kernel: Array, dtype: Dtype, interpret: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """``z = conv1x1(x, kernel)`` in ``dtype`` and z's per-channel ``mean(z)`` and ``mean(z * z)``
    over all positions (the next BatchNorm's statistics), from one kernel
    (:func:`matmul_moments` without a prologue) that sums them as it stores z, so the
    BatchNorm after it reads z once (to apply itself) instead of twice.

    x is (..., K) NHWC; ``kernel`` is (K, N) or the convolution's (1, 1, K, N); both are cast to
    ``dtype`` like flax's ``Conv``. z is (..., N) in ``dtype``; the moments are float32 (N,),
    taken from z as stored, and carry the derivative of the two means with respect to z (as
    ``pallas_batch_norm.batch_moments``, so the BatchNorm's backward pass is the model's). z's
    own derivative is the convolution's, written with ``jax.lax.conv_general_dilated``: reverse
    mode is XLA's transposed convolutions (cuDNN on a GPU), exactly as for ``nn.Conv``;
    first-order forward and reverse mode work. The kernel is compiled for an NVIDIA GPU;
    ``interpret=True`` runs it under the Pallas interpreter. Shapes it does not take (fewer than
    16 channels or rows in a block, input channels not a power of two) run in XLA."""
    z, sums = _conv1x1_sums(x, kernel, dtype, interpret)
    return z, moments_from_sums(z.astype(jnp.float32).reshape(-1, z.shape[-1]), sums)


def _conv1x1_xla(x: Array, kernel: Array, dtype: Dtype) -> Array:
    """The 1x1 convolution as ``nn.Conv`` computes it (``layers.conv1x1``), for any kernel shape."""
    k = x.shape[-1]
    return jax.lax.conv_general_dilated(x.astype(dtype), kernel.reshape(1, 1, k, -1).astype(dtype), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv1x1_sums(x: Array, kernel: Array, dtype: Dtype, interpret: bool = False) -> tuple[Array, Array]:
    """z and the float32 (2, N) row sums of z and z * z, which carry no derivative of their own
    (:func:`moments_from_sums` gives the moments theirs). x is (N, H, W, K)."""
    k = x.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    z, sums = _sharded_forward(jnp.dtype(dtype), interpret, prologue=False)(x.reshape(-1, k).astype(dtype), w)
    return z.reshape(*x.shape[:-1], w.shape[1]), sums


@_conv1x1_sums.defjvp
def _conv1x1_sums_jvp(dtype: Dtype, interpret: bool, primals: tuple, tangents: tuple) -> tuple:
    (x, kernel), (tx, tkernel) = primals, tangents
    z, sums = _conv1x1_sums(x, kernel, dtype, interpret)
    # linear in (tx, tkernel): reverse mode transposes these two convolutions as it does nn.Conv's
    tz = _conv1x1_xla(tx, kernel, dtype) + _conv1x1_xla(x, tkernel, dtype)
    return (z, sums), (tz, jnp.zeros_like(sums))
