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

:func:`gram_backward` (change 15, where ``GRAM_BACKWARD`` is set) is the reverse pass of the
two ops with a BatchNorm after their GEMM (:func:`bn_relu_conv1x1_bn`, :func:`conv1x1_bn`)
without z: since z = y @ w, the BatchNorm's gradient sums and z's terms in both backward
GEMMs are taken from products of the GEMM's input y (``y^T g``, :func:`gram`'s ``y^T y``,
:func:`input_grad_gram`'s ``y @ (w diag(s) w^T)``), a quarter of z's width in a Bottleneck,
and z is not kept for the backward pass (compiled for ResNet-50 with changes 9-13: 75.9 ->
68.0 GiB per step, peak 9.64 -> 6.35 GiB). :func:`bn_relu_conv1x1_bn_add_relu` (change 16,
where ``blocks.FUSE_RESIDUAL`` is set) goes one step further: z's statistics are products of
y too, so :func:`gram` runs before the GEMM and :func:`matmul_bn_add_relu`'s epilogue applies
bn3, adds the shortcut and applies the ReLU; z is never stored (68.0 -> 64.4 GiB).
:func:`bn_relu_conv1x1_bn_add_conv1x1_bn_relu` (change 17, where ``blocks.FUSE_PROJECTION`` is
set) does the same in projection blocks, whose shortcut (a 1x1 convolution and a BatchNorm) it
computes in the same kernel (:func:`matmul_bn_add_matmul_bn_relu`): neither convolution's output
is stored (64.4 -> 61.5 GiB). In both ops' reverse pass, the block's last ReLU's mask is applied
by the kernel that takes y^T g, which reads the output's gradient and the output in g's place
and stores g and its column sums as it goes (:func:`weight_grad`'s ``(dout, out)``; change 18):
XLA's pass that made g is gone (61.5 -> 59.0 GiB).
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
    relu_grad,
    row_sharded_op,
)

Array = jax.Array
Dtype = Any

# The forward kernel: rows (N*H*W positions) and output channels per instance, input channels
# per step of its loop, warps, and Triton's pipelining depth; the input-gradient GEMMs take the
# same (BLOCK_N for their input channels). Read at trace time. 64 rows of 4 warps is a candidate
# (docs/performance.md, change 19: more instances per SM for these bandwidth-bound GEMMs).
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 2
# The weight-gradient kernel: input and output channels per instance, rows per step of its
# loop, warps, and the number of instances it aims for by splitting the rows (each split
# writes a float32 (K, N) partial sum, which XLA adds).
WGRAD_BLOCK_K, WGRAD_BLOCK_N, WGRAD_SUB_ROWS, WGRAD_NUM_WARPS, WGRAD_PROGRAMS = 64, 128, 32, 4, 528
# A candidate, off until the device times it (docs/performance.md, change 12): in
# :func:`bn_relu_conv1x1_bn`'s reverse pass, the input-gradient GEMM also sums bn2's backward
# statistics as it stores its output (x read once in its epilogue), instead of
# ``pallas_batch_norm.relu_grad_sums`` reading x and that output again. Read at trace time.
INPUT_GRAD_SUMS = False
# A candidate, off until the device times it (docs/performance.md, change 15): in the reverse pass
# of the ops with a BatchNorm after their GEMM (:func:`bn_relu_conv1x1_bn`, :func:`conv1x1_bn`), the
# BatchNorm's gradient is taken through the GEMM's algebra instead of from its stored input z:
# ``sum(g * z) = sum(w * (y^T g))`` over the input channels, and z's terms of dz enter the two
# backward GEMMs as ``(y^T y) @ w`` and ``y @ (w diag(s) w^T)`` (:func:`gram_backward`), so that no
# pass of the backward reads z. Read at trace time.
GRAM_BACKWARD = False
# A candidate, off until the device times it (docs/performance.md, change 16): a Bottleneck's bn3,
# residual add and ReLU in the epilogue of change 11's forward GEMM
# (:func:`bn_relu_conv1x1_bn_add_relu`, used where ``blocks.FUSE_RESIDUAL`` is set): bn3's
# statistics come from y^T y before the GEMM, so z is never stored. Its reverse pass is
# :func:`gram_backward`'s.


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


def _forward_residual_kernel(x_ref, mean_ref, a_ref, b_ref, w_ref, a3_ref, b3_ref, r_ref, y_ref, *,
                             block_k: int) -> None:
    """One (rows, out channels) block of :func:`matmul_bn_add_relu`: ``z = relu_bn(x) @ w``
    accumulated in float32 over the input channels ``block_k`` at a time, then
    ``y = relu(z * a3 + b3 + r)`` in float32, stored in y's dtype; z itself is never stored."""
    rows, cols = y_ref.shape

    def body(i: int, acc: Array) -> Array:
        ks = pl.ds(i * block_k, block_k)
        y = relu_bn(x_ref[:, ks], mean_ref[:, ks], a_ref[:, ks], b_ref[:, ks])
        return acc + jnp.dot(y.astype(w_ref.dtype), w_ref[ks, :], preferred_element_type=jnp.float32)

    z = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros((rows, cols), jnp.float32))
    u = z * a3_ref[...] + b3_ref[...] + r_ref[...].astype(jnp.float32)
    y_ref[...] = jnp.maximum(u, 0.0).astype(y_ref.dtype)


def _forward_projection_kernel(x_ref, mean_ref, a_ref, b_ref, w_ref, a3_ref, b3_ref, xs_ref, ws_ref, as_ref, bs_ref,
                               y_ref, *, block_k: int, block_ks: int) -> None:
    """One (rows, out channels) block of :func:`matmul_bn_add_matmul_bn_relu`: ``z = relu_bn(x) @ w``
    and ``zs = xs @ ws``, each accumulated in float32 over its input channels, then
    ``y = relu(z * a3 + b3 + zs * as + bs)`` in float32, stored in y's dtype; neither z nor zs is
    stored."""
    rows, cols = y_ref.shape

    def body(i: int, acc: Array) -> Array:
        ks = pl.ds(i * block_k, block_k)
        y = relu_bn(x_ref[:, ks], mean_ref[:, ks], a_ref[:, ks], b_ref[:, ks])
        return acc + jnp.dot(y.astype(w_ref.dtype), w_ref[ks, :], preferred_element_type=jnp.float32)

    def shortcut_body(i: int, acc: Array) -> Array:
        ks = pl.ds(i * block_ks, block_ks)
        return acc + jnp.dot(xs_ref[:, ks], ws_ref[ks, :], preferred_element_type=jnp.float32)

    z = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros((rows, cols), jnp.float32))
    zs = jax.lax.fori_loop(0, xs_ref.shape[1] // block_ks, shortcut_body, jnp.zeros((rows, cols), jnp.float32))
    u = z * a3_ref[...] + b3_ref[...] + (zs * as_ref[...] + bs_ref[...])
    y_ref[...] = jnp.maximum(u, 0.0).astype(y_ref.dtype)


def affine_grad(g: Array, z: Array, scale_g: Array, scale_z: Array, shift: Array) -> Array:
    """``scale_g * g + scale_z * z + shift`` in float32, per channel (the vectors broadcast over
    rows): a BatchNorm's input gradient written as a function of its output's gradient g and
    its input z, which the backward kernels compute as they load g and z (:func:`input_grad`,
    :func:`weight_grad`) instead of reading a stored dz."""
    return g.astype(jnp.float32) * scale_g + z.astype(jnp.float32) * scale_z + shift


def _wgrad_kernel(x_ref, *refs, rows: int, sub: int, prologue: bool, dz_form: str, colsum: bool) -> None:
    """Instance (n, k, s): ``dw = relu_bn(x)^T @ dz`` (``prologue``; else ``x^T @ dz``) over rows
    ``[s * rows, (s + 1) * rows)``, ``sub`` rows at a time, for one (input, output) channel
    block, in float32. The refs hold all rows of their channel block; after x come ``mean, a,
    b`` (``prologue``), then by ``dz_form``: ``dz`` (``plain``), ``g, z, scale_g, scale_z,
    shift`` (``affine``: dz is :func:`affine_grad` of them, rounded to g's dtype as a stored dz
    would be), ``x2, mean2, a2, b2`` (``relu_bn``: dz is ``relu_bn(x2, ...)`` rounded to x2's
    dtype, for a Gram matrix) or ``dout, out`` (``masked``: dz is dout where ``out > 0``, else
    0: the gradient through a ReLU from its output), then ``dw``, then (``colsum``) the column
    sums of the left operand as multiplied, float32 (1, block_k), or (``masked``) dz as computed,
    stored by the instances of the first input-channel block (k = 0) for their rows, and its
    float32 (1, block_n) column sums over them."""
    if prologue:
        mean_ref, a_ref, b_ref, *refs = refs
    if colsum:
        *refs, colsum_ref = refs
    stores_dz = dz_form == "masked"
    if stores_dz:
        *refs, dz_out_ref, dz_sums_ref = refs
    *dz_refs, dw_ref = refs
    start = pl.program_id(2) * rows
    block_k, block_n = dw_ref.shape
    compute_dtype = dz_refs[0].dtype

    def dz_rows(rs: Any) -> Array:
        if dz_form == "plain":
            return dz_refs[0][rs, :]
        if dz_form == "relu_bn":
            x2_ref, mean2, a2, b2 = dz_refs
            return relu_bn(x2_ref[rs, :], mean2[...], a2[...], b2[...]).astype(compute_dtype)
        if dz_form == "masked":
            dout_ref, out_ref = dz_refs
            dout = dout_ref[rs, :]
            return jnp.where(out_ref[rs, :] > 0, dout, jnp.zeros_like(dout))
        g_ref, z_ref, scale_g, scale_z, shift = dz_refs
        return affine_grad(g_ref[rs, :], z_ref[rs, :], scale_g[...], scale_z[...], shift[...]).astype(compute_dtype)

    first_k_block = pl.program_id(1) == 0

    def body(i: int, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        acc, sums, dz_sums = carry
        rs = pl.ds(start + i * sub, sub)
        y = x_ref[rs, :]
        if prologue:
            y = relu_bn(y, mean_ref[...], a_ref[...], b_ref[...])
        y = y.astype(compute_dtype)
        dz = dz_rows(rs)
        acc = acc + jax.lax.dot_general(y, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        if colsum:
            sums = sums + jnp.sum(y.astype(jnp.float32), axis=0, keepdims=True)
        if stores_dz:
            @pl.when(first_k_block)
            def _store() -> None:
                dz_out_ref[rs, :] = dz

            dz_sums = dz_sums + jnp.sum(dz.astype(jnp.float32), axis=0, keepdims=True)
        return acc, sums, dz_sums

    acc, sums, dz_sums = jax.lax.fori_loop(0, rows // sub, body, (jnp.zeros((block_k, block_n), jnp.float32),
                                                                 jnp.zeros((1, block_k), jnp.float32),
                                                                 jnp.zeros((1, block_n), jnp.float32)))
    dw_ref[...] = acc
    if colsum:
        colsum_ref[...] = sums
    if stores_dz:
        @pl.when(first_k_block)
        def _store_sums() -> None:
            dz_sums_ref[...] = dz_sums


def _input_grad_kernel(g_ref, z_ref, scale_g_ref, scale_z_ref, shift_ref, wt_ref, *refs, block_n: int) -> None:
    """One (rows, input channels) block: ``dy = affine_grad(g, z, ...) @ wt``, accumulated in
    float32 over the output channels ``block_n`` at a time, dz rounded to wt's dtype before the
    product (as a stored dz would be), dy stored in its dtype. The refs after wt are ``dy``, or
    ``x, mean, a, b, dy, sums``: then the epilogue also sums, over the block's rows, the
    gradient of the BatchNorm + ReLU that made the GEMM's input (``relu_bn(x, mean, a, b)``):
    ``sums[0] = sum of g2``, ``sums[1] = sum of g2 * (x - mean)``, g2 = the stored dy where
    ``(x - mean) * a + b > 0`` else 0, in float32 (what ``pallas_batch_norm.relu_grad_sums``
    reads x and dy again for)."""
    if len(refs) == 1:
        (dy_ref,), bn_refs = refs, None
    else:
        *bn_refs, dy_ref, sums_ref = refs
    rows, cols = dy_ref.shape

    def body(i: int, acc: Array) -> Array:
        ns = pl.ds(i * block_n, block_n)
        dz = affine_grad(g_ref[:, ns], z_ref[:, ns], scale_g_ref[:, ns], scale_z_ref[:, ns], shift_ref[:, ns])
        return acc + jnp.dot(dz.astype(wt_ref.dtype), wt_ref[ns, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, g_ref.shape[1] // block_n, body, jnp.zeros((rows, cols), jnp.float32))
    dy = acc.astype(dy_ref.dtype)
    dy_ref[...] = dy
    if bn_refs is not None:
        x_ref, mean_ref, a_ref, b_ref = bn_refs
        g2, centred = relu_grad(x_ref[...], dy, mean_ref[...], a_ref[...], b_ref[...])
        sums_ref[0, :] = jnp.sum(g2, axis=0)
        sums_ref[1, :] = jnp.sum(g2 * centred, axis=0)


def _input_grad_gram_kernel(g_ref, scale_g_ref, wt_ref, x_ref, *refs, block_n: int, block_k: int,
                            prologue: bool, sums: bool) -> None:
    """One (rows, input channels) block of :func:`input_grad_gram`: ``dy = (g * scale_g) @ wt +
    y @ p + c``, y the GEMM's input (``relu_bn(x, mean, a, b)`` where ``prologue``, else x) in
    p's dtype, accumulated in float32 over the output channels ``block_n`` and the input
    channels ``block_k`` at a time, ``g * scale_g`` rounded to wt's dtype before its product,
    dy stored in its dtype. x's refs hold all K channels of the block's rows. The refs after x
    are ``[mean, a, b,] p, c, dy[, sums]``; ``sums`` (with ``prologue``): the epilogue also sums
    the gradient of the BatchNorm + ReLU that made y, as :func:`_input_grad_kernel`'s does."""
    if prologue:
        mean_ref, a_ref, b_ref, *refs = refs
    if sums:
        *refs, sums_ref = refs
    p_ref, c_ref, dy_ref = refs
    rows, cols = dy_ref.shape

    def input_rows(ks: Any) -> Array:
        y = x_ref[:, ks]
        if prologue:
            y = relu_bn(y, mean_ref[:, ks], a_ref[:, ks], b_ref[:, ks])
        return y.astype(p_ref.dtype)

    def over_outputs(i: int, acc: Array) -> Array:
        ns = pl.ds(i * block_n, block_n)
        dz = g_ref[:, ns].astype(jnp.float32) * scale_g_ref[:, ns]
        return acc + jnp.dot(dz.astype(wt_ref.dtype), wt_ref[ns, :], preferred_element_type=jnp.float32)

    def over_inputs(i: int, acc: Array) -> Array:
        ks = pl.ds(i * block_k, block_k)
        return acc + jnp.dot(input_rows(ks), p_ref[ks, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, g_ref.shape[1] // block_n, over_outputs, jnp.zeros((rows, cols), jnp.float32))
    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, over_inputs, acc)
    dy = (acc + c_ref[...]).astype(dy_ref.dtype)
    dy_ref[...] = dy
    if sums:
        own = pl.ds(pl.program_id(0) * cols, cols)
        g2, centred = relu_grad(x_ref[:, own], dy, mean_ref[:, own], a_ref[:, own], b_ref[:, own])
        sums_ref[0, :] = jnp.sum(g2, axis=0)
        sums_ref[1, :] = jnp.sum(g2 * centred, axis=0)


def _prologue_given(mean: Array | None, a: Array | None, b: Array | None, caller: str) -> bool:
    """Whether a kernel applies a BatchNorm + ReLU to its input (``mean``, ``a``, ``b`` given)."""
    prologue = mean is not None
    if prologue != (a is not None) or prologue != (b is not None):
        raise ValueError(f"{caller}: give mean, a and b together (the BatchNorm before the product), or none")
    return prologue


def _fits(*sizes: int) -> bool:
    """Triton's dot needs power-of-two blocks of at least 16 along each dimension."""
    return all(s >= 16 for s in sizes)


def _gemm_blocks(rows: int, out: int, inner: int, block_rows: int, block_out: int,
                 block_inner: int) -> tuple[int, int, int] | None:
    """The blocks of a GEMM kernel whose instances each own (rows, out) and loop over all of
    ``inner``: the largest powers of two up to the given ones that divide each dimension, or
    None where one is under 16 or ``inner`` is not a power of two (the caller then uses XLA)."""
    blocks = tuple(_largest_power_of_two_divisor(d, b) for d, b in
                   ((rows, block_rows), (out, block_out), (inner, block_inner)))
    return None if not _fits(*blocks) or inner & (inner - 1) else blocks


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
    prologue = _prologue_given(mean, a, b, "matmul_moments")
    if (blocks := _gemm_blocks(m, n, k, block_m or BLOCK_M, block_n or BLOCK_N, block_k or BLOCK_K)) is None:
        return None
    bm, bn, bk = blocks
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


def matmul_bn_add_relu(
    x: Array, mean: Array, a: Array, b: Array, w: Array, a3: Array, b3: Array, residual: Array, *,
    interpret: bool = False, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> Array | None:
    """``relu((relu((x - mean) * a + b) @ w) * a3 + b3 + residual)`` in the residual's dtype, (M, N),
    in one Pallas (Triton) kernel: :func:`matmul_moments`' GEMM with its prologue, whose
    epilogue applies the next BatchNorm (``a3``, ``b3``: float32 (N,), its scale over the
    standard deviation and its shift, from statistics known before the GEMM), adds the
    residual (M, N) and applies the ReLU. x (M, K) and w (K, N) in the compute dtype, ``mean``,
    ``a``, ``b`` float32 (K,). Returns None where :func:`matmul_moments` would (the caller then
    uses XLA). A GPU only, unless ``interpret``."""
    m, k = x.shape
    n = w.shape[1]
    if (blocks := _gemm_blocks(m, n, k, block_m or BLOCK_M, block_n or BLOCK_N, block_k or BLOCK_K)) is None:
        return None
    bm, bn, bk = blocks
    grid = (n // bn, m // bm)  # as matmul_moments: the instances that share a block of x run together
    in_vector = pl.BlockSpec((1, k), lambda j, i: (0, 0))
    out_vector = pl.BlockSpec((1, bn), lambda j, i: (0, j))
    rows_out = pl.BlockSpec((bm, bn), lambda j, i: (i, j))
    return pl.pallas_call(
        functools.partial(_forward_residual_kernel, block_k=bk),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, k), lambda j, i: (i, 0)), in_vector, in_vector, in_vector,
                  pl.BlockSpec((k, bn), lambda j, i: (0, j)), out_vector, out_vector, rows_out],
        out_specs=rows_out,
        out_shape=jax.ShapeDtypeStruct((m, n), residual.dtype),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        name="bn_relu_matmul_bn_add_relu",
    )(x, mean.reshape(1, k), a.reshape(1, k), b.reshape(1, k), w, a3.reshape(1, n), b3.reshape(1, n), residual)


def matmul_bn_add_matmul_bn_relu(
    x: Array, mean: Array, a: Array, b: Array, w: Array, a3: Array, b3: Array, xs: Array, ws: Array,
    a_s: Array, b_s: Array, *, out_dtype: Dtype, interpret: bool = False, block_m: int | None = None,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> Array | None:
    """``relu((relu((x - mean) * a + b) @ w) * a3 + b3 + (xs @ ws) * a_s + b_s)`` in ``out_dtype``,
    (M, N), in one Pallas (Triton) kernel: a projection block's output, its residual branch's
    last GEMM (:func:`matmul_bn_add_relu`'s, with bn2 + ReLU as its prologue and bn3 in its
    epilogue) and its shortcut's 1x1 convolution and BatchNorm computed side by side, added
    and ReLU'd as the output is stored. xs (M, Ks) is the shortcut's input (every s-th pixel
    of the block's input for a stride-s projection), ws (Ks, N); the vectors float32. Returns
    None where :func:`matmul_moments` would for either GEMM (the caller then uses XLA). A GPU
    only, unless ``interpret``."""
    m, k = x.shape
    n, ks = w.shape[1], xs.shape[1]
    blocks = _gemm_blocks(m, n, k, block_m or BLOCK_M, block_n or BLOCK_N, block_k or BLOCK_K)
    shortcut_blocks = _gemm_blocks(m, n, ks, block_m or BLOCK_M, block_n or BLOCK_N, block_k or BLOCK_K)
    if blocks is None or shortcut_blocks is None:
        return None
    bm, bn, bk = blocks
    grid = (n // bn, m // bm)  # as matmul_moments: the instances that share rows of x run together
    in_vector = pl.BlockSpec((1, k), lambda j, i: (0, 0))
    out_vector = pl.BlockSpec((1, bn), lambda j, i: (0, j))
    return pl.pallas_call(
        functools.partial(_forward_projection_kernel, block_k=bk, block_ks=shortcut_blocks[2]),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, k), lambda j, i: (i, 0)), in_vector, in_vector, in_vector,
                  pl.BlockSpec((k, bn), lambda j, i: (0, j)), out_vector, out_vector,
                  pl.BlockSpec((bm, ks), lambda j, i: (i, 0)), pl.BlockSpec((ks, bn), lambda j, i: (0, j)),
                  out_vector, out_vector],
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        name="bn_relu_matmul_bn_add_matmul_bn_relu",
    )(x, mean.reshape(1, k), a.reshape(1, k), b.reshape(1, k), w, a3.reshape(1, n), b3.reshape(1, n), xs, ws,
      a_s.reshape(1, n), b_s.reshape(1, n))


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
    x: Array, mean: Array | None, a: Array | None, b: Array | None, dz: Array | tuple[Array, ...], *,
    colsum: bool = False, interpret: bool = False, block_k: int | None = None, block_n: int | None = None,
    sub_rows: int | None = None, num_warps: int | None = None, programs: int | None = None,
) -> Array | tuple[Array, Array] | tuple[Array, Array, Array] | None:
    """``relu((x - mean) * a + b)^T @ dz``, float32 (K, N), for x (M, K) and dz (M, N) in the
    compute dtype, in one Pallas (Triton) kernel that recomputes the ReLU'd BatchNorm from x
    (``mean``, ``a``, ``b`` float32 (K,); all three None for ``x^T @ dz``).
    ``dz`` may instead be ``(g, z, scale_g, scale_z, shift)``, g and z (M, N) and the others
    float32 (N,): dz is then :func:`affine_grad` of them, computed as they are loaded; or
    ``(x2, mean2, a2, b2)``, x2 (M, N) and the others float32 (N,): dz is then
    ``relu((x2 - mean2) * a2 + b2)`` in x2's dtype (with x2 = x, a Gram matrix: :func:`gram`);
    or ``(dout, out)``, both (M, N): dz is then dout where ``out > 0``, else 0 (the gradient
    through a ReLU, from its output and its output's gradient), and the kernel also stores that
    dz, returning ``(dw, dz, float32 (N,) column sums of dz)``: the masked gradient costs no pass
    of its own (:func:`gram_backward`'s ``relu_output``). ``colsum``: also returns the float32
    (K,) column sums of the left operand as it was multiplied (rounded to the compute dtype), as
    ``(dw, colsum)``.
    The rows are split into ranges so that the kernel runs about ``programs`` instances, as
    long as their float32 (K, N) partial sums, which XLA adds, stay under an eighth of the
    bytes the kernel reads. Returns None where the blocks would be
    smaller than 16 (the caller then uses XLA). A GPU only, unless ``interpret``."""
    m, k = x.shape
    prologue = _prologue_given(mean, a, b, "weight_grad")
    dz_args = tuple(dz) if isinstance(dz, tuple) else (dz,)
    dz_form = {1: "plain", 2: "masked", 4: "relu_bn", 5: "affine"}[len(dz_args)]
    if colsum and dz_form == "masked":
        raise ValueError("weight_grad: colsum is not taken with a masked dz (dout, out)")
    rows_in = dz_args[:2] if dz_form in ("affine", "masked") else dz_args[:1]
    n = rows_in[0].shape[1]
    bk = _largest_power_of_two_divisor(k, block_k or WGRAD_BLOCK_K)
    bn = _largest_power_of_two_divisor(n, block_n or WGRAD_BLOCK_N)
    sub = _largest_power_of_two_divisor(m, sub_rows or WGRAD_SUB_ROWS)
    if not _fits(bk, bn, sub):
        return None
    # each range writes a float32 (K, N) partial sum that XLA reads back: at most an eighth of
    # the bytes the kernel has to read anyway
    most = (x.size * x.dtype.itemsize + sum(r.size * r.dtype.itemsize for r in rows_in)) // (8 * k * n * 4)
    splits = _row_splits(m, sub, (k // bk) * (n // bn), programs or WGRAD_PROGRAMS, most)
    # Row ranges are the grid's last (slowest-launched) dimension: the instances that read the
    # same rows of x and dz run together, so those rows come from memory once and from L2 after.
    grid = (n // bn, k // bk, splits)
    vector = pl.BlockSpec((1, bk), lambda j, i, s: (0, i))
    rows_spec = pl.BlockSpec((m, bn), lambda j, i, s: (0, j))
    out_vector = pl.BlockSpec((1, bn), lambda j, i, s: (0, j))
    dz_specs = [rows_spec] * len(rows_in) + [out_vector] * (len(dz_args) - len(rows_in))
    dz_vectors = [v.reshape(1, n) for v in dz_args[len(rows_in):]]
    vectors = [v.reshape(1, k) for v in (mean, a, b)] if prologue else []
    out_specs = [pl.BlockSpec((None, bk, bn), lambda j, i, s: (s, i, j))]
    out_shape = [jax.ShapeDtypeStruct((splits, k, n), jnp.float32)]
    if colsum:  # every output-channel block j sums the same columns: each writes its own copy
        out_specs.append(pl.BlockSpec((None, None, 1, bk), lambda j, i, s: (s, j, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct((splits, n // bn, 1, k), jnp.float32))
    if dz_form == "masked":  # dz and its column sums, written by the instances of the first k block
        out_specs += [rows_spec, pl.BlockSpec((None, 1, bn), lambda j, i, s: (s, 0, j))]
        out_shape += [jax.ShapeDtypeStruct((m, n), rows_in[0].dtype),
                      jax.ShapeDtypeStruct((splits, 1, n), jnp.float32)]
    out = pl.pallas_call(
        functools.partial(_wgrad_kernel, rows=m // splits, sub=sub, prologue=prologue, dz_form=dz_form,
                          colsum=colsum),
        grid=grid,
        in_specs=[pl.BlockSpec((m, bk), lambda j, i, s: (0, i)), *[vector] * len(vectors), *dz_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps or WGRAD_NUM_WARPS,
                                                                     num_stages=2),
        name=("bn_relu_" if prologue else "") + ("gram" if colsum else "matmul_weight_grad")
        + {"affine": "_affine", "masked": "_relu_mask"}.get(dz_form, ""),
    )(x, *vectors, *rows_in, *dz_vectors)
    dw = jnp.sum(out[0], axis=0)
    if dz_form == "masked":
        return dw, out[1], jnp.sum(out[2][:, 0, :], axis=0)
    return (dw, jnp.sum(out[1][:, 0, 0, :], axis=0)) if colsum else dw


def gram(x: Array, mean: Array | None, a: Array | None, b: Array | None, *,
         interpret: bool = False) -> tuple[Array, Array] | None:
    """``(y^T y, sum of y's rows)``, float32 (K, K) and (K,), for ``y = relu((x - mean) * a + b)``
    (or ``y = x`` with the three vectors None) rounded to x's dtype, x (M, K): the two products
    of the GEMM's input with itself that :func:`gram_backward` needs, in one pass over x (the
    weight-gradient kernel with x on both sides). None where the kernel does not take the
    shapes (the caller then uses XLA). A GPU only, unless ``interpret``."""
    right = x if mean is None else (x, mean, a, b)
    return weight_grad(x, mean, a, b, right, colsum=True, interpret=interpret)


def input_grad(
    g: Array, z: Array, scale_g: Array, scale_z: Array, shift: Array, w: Array,
    relu_bn_input: tuple[Array, Array, Array, Array] | None = None, *, out_dtype: Dtype,
    interpret: bool = False, block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> Array | tuple[Array, Array] | None:
    """``affine_grad(g, z, scale_g, scale_z, shift) @ w^T`` in ``out_dtype``, (M, K), for g and z
    (M, N) in the compute dtype, the vectors float32 (N,) and w (K, N), in one Pallas (Triton)
    kernel that computes dz as it loads g and z: the input gradient of a 1x1 convolution
    followed by a BatchNorm, without dz stored. Returns None where N is not a power of two or
    the blocks would be smaller than 16 (the caller then uses XLA). Block parameters left None
    are the forward kernel's (``BLOCK_M``; ``BLOCK_N`` for the input channels, ``BLOCK_K`` for
    the output channels it loops over). A GPU only, unless ``interpret``.

    ``relu_bn_input = (x, mean, a, b)``, x (M, K) in the compute dtype and the vectors float32
    (K,), the BatchNorm + ReLU whose output was the product's input: then also returns the
    float32 (2, K) sums of its gradient, ``pallas_batch_norm.relu_grad_sums(x, dy, mean, a,
    b)``, summed as dy is stored (x read once, in the epilogue), as ``(dy, sums)``."""
    m, n = g.shape
    k = w.shape[0]
    if (blocks := _gemm_blocks(m, k, n, block_m or BLOCK_M, block_k or BLOCK_N, block_n or BLOCK_K)) is None:
        return None
    bm, bk, bn = blocks
    # the input-channel blocks first: the instances that share rows of g and z run together
    grid = (k // bk, m // bm)
    rows = pl.BlockSpec((bm, n), lambda j, i: (i, 0))
    vector = pl.BlockSpec((1, n), lambda j, i: (0, 0))
    dy_spec, dy_shape = pl.BlockSpec((bm, bk), lambda j, i: (i, j)), jax.ShapeDtypeStruct((m, k), out_dtype)
    bn_args, bn_specs, out_specs, out_shape = [], [], dy_spec, dy_shape
    if relu_bn_input is not None:
        x, *vectors = relu_bn_input
        bn_args = [x, *(v.reshape(1, k) for v in vectors)]
        bn_specs = [dy_spec, *[pl.BlockSpec((1, bk), lambda j, i: (0, j))] * 3]
        out_specs = [dy_spec, pl.BlockSpec((None, 2, bk), lambda j, i: (i, 0, j))]
        out_shape = [dy_shape, jax.ShapeDtypeStruct((m // bm, 2, k), jnp.float32)]
    out = pl.pallas_call(
        functools.partial(_input_grad_kernel, block_n=bn),
        grid=grid,
        in_specs=[rows, rows, vector, vector, vector, pl.BlockSpec((n, bk), lambda j, i: (0, j)), *bn_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        name="affine_grad_matmul" if relu_bn_input is None else "affine_grad_matmul_relu_grad_sums",
    )(g, z, scale_g.reshape(1, n), scale_z.reshape(1, n), shift.reshape(1, n), w.T, *bn_args)
    if relu_bn_input is None:
        return out
    dy, partial = out
    return dy, jnp.sum(partial, axis=0)


def input_grad_gram(
    g: Array, scale_g: Array, w: Array, x: Array, mean: Array | None, a: Array | None, b: Array | None,
    p: Array, c: Array, *, sums: bool = False, out_dtype: Dtype, interpret: bool = False,
    block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> Array | tuple[Array, Array] | None:
    """``(g * scale_g) @ w^T + y @ p + c`` in ``out_dtype``, (M, K), with y the GEMM's input
    ``relu((x - mean) * a + b)`` (the three vectors None: x), in one Pallas (Triton) kernel:
    :func:`gram_backward`'s input gradient of a 1x1 convolution followed by a BatchNorm, whose
    z terms enter as ``y @ p`` (p = ``w diag(scale_z) w^T``, (K, K) in the compute dtype) and
    ``c`` (float32 (K,)), so that z is not read. g is (M, N) and x (M, K) in the compute dtype,
    ``scale_g`` float32 (N,), w (K, N). ``sums`` (with the vectors): also returns the float32
    (2, K) sums of the BatchNorm + ReLU's gradient (as :func:`input_grad`'s ``relu_bn_input``),
    as ``(dy, sums)``. Returns None where N or K is not a power of two or a block would be
    smaller than 16 (the caller then uses XLA). A GPU only, unless ``interpret``."""
    m, n = g.shape
    k = w.shape[0]
    prologue = _prologue_given(mean, a, b, "input_grad_gram")
    if sums and not prologue:
        raise ValueError("input_grad_gram: sums are those of the BatchNorm + ReLU before the GEMM; give mean, a, b")
    if (blocks := _gemm_blocks(m, k, n, block_m or BLOCK_M, block_k or BLOCK_N, block_n or BLOCK_K)) is None:
        return None
    bm, bk, bn = blocks
    inner_k = _largest_power_of_two_divisor(k, block_n or BLOCK_K)
    if not _fits(inner_k) or k & (k - 1):
        return None
    grid = (k // bk, m // bm)  # the input-channel blocks first: the instances that share rows run together
    vectors = [v.reshape(1, k) for v in (mean, a, b)] if prologue else []
    dy_spec, dy_shape = pl.BlockSpec((bm, bk), lambda j, i: (i, j)), jax.ShapeDtypeStruct((m, k), out_dtype)
    out_specs, out_shape = [dy_spec], [dy_shape]
    if sums:
        out_specs.append(pl.BlockSpec((None, 2, bk), lambda j, i: (i, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((m // bm, 2, k), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_input_grad_gram_kernel, block_n=bn, block_k=inner_k, prologue=prologue, sums=sums),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, n), lambda j, i: (i, 0)), pl.BlockSpec((1, n), lambda j, i: (0, 0)),
                  pl.BlockSpec((n, bk), lambda j, i: (0, j)), pl.BlockSpec((bm, k), lambda j, i: (i, 0)),
                  *[pl.BlockSpec((1, k), lambda j, i: (0, 0))] * len(vectors),
                  pl.BlockSpec((k, bk), lambda j, i: (0, j)), pl.BlockSpec((1, bk), lambda j, i: (0, j))],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        name="gram_grad_matmul" + ("_relu_grad_sums" if sums else ""),
    )(g, scale_g.reshape(1, n), w.T, x, *vectors, p, c.reshape(1, k))
    return (out[0], jnp.sum(out[1], axis=0)) if sums else out[0]


# ---------------------------------------------------------------- XLA's versions (fallback)
def _matmul_moments_xla(x: Array, mean: Array | None, a: Array | None, b: Array | None, w: Array,
                        out_dtype: Dtype) -> tuple[Array, Array]:
    y = x if mean is None else relu_bn(x, mean, a, b)
    z = jnp.dot(y.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(out_dtype)
    zf = z.astype(jnp.float32)
    return z, jnp.stack([jnp.sum(zf, axis=0), jnp.sum(zf * zf, axis=0)])


def _weight_grad_xla(x: Array, mean: Array | None, a: Array | None, b: Array | None,
                     dz: Array | tuple[Array, ...]) -> Array | tuple[Array, Array, Array]:
    masked = isinstance(dz, tuple) and len(dz) == 2
    if masked:
        dout, out = dz
        dz = jnp.where(out > 0, dout, jnp.zeros_like(dout))
    elif isinstance(dz, tuple):
        dz = affine_grad(*dz).astype(dz[0].dtype)
    y = (x if mean is None else relu_bn(x, mean, a, b)).astype(dz.dtype)
    dw = jax.lax.dot_general(y, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (dw, dz, jnp.sum(dz.astype(jnp.float32), axis=0)) if masked else dw


def _input_grad_xla(g: Array, z: Array, scale_g: Array, scale_z: Array, shift: Array, w: Array,
                    relu_bn_input: tuple[Array, Array, Array, Array] | None = None, *,
                    out_dtype: Dtype) -> Array | tuple[Array, Array]:
    dz = affine_grad(g, z, scale_g, scale_z, shift).astype(w.dtype)
    dy = jnp.dot(dz, w.T, preferred_element_type=jnp.float32).astype(out_dtype)
    if relu_bn_input is None:
        return dy
    x, mean, a, b = relu_bn_input
    g2, centred = relu_grad(x, dy, mean, a, b)
    return dy, jnp.stack([jnp.sum(g2, axis=0), jnp.sum(g2 * centred, axis=0)])


def _gram_xla(x: Array, mean: Array | None, a: Array | None, b: Array | None) -> tuple[Array, Array]:
    y = (x if mean is None else relu_bn(x, mean, a, b)).astype(x.dtype)
    return (jax.lax.dot_general(y, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32),
            jnp.sum(y.astype(jnp.float32), axis=0))


def _input_grad_gram_xla(g: Array, scale_g: Array, w: Array, x: Array, mean: Array | None, a: Array | None,
                         b: Array | None, p: Array, c: Array, *, sums: bool = False,
                         out_dtype: Dtype) -> Array | tuple[Array, Array]:
    y = (x if mean is None else relu_bn(x, mean, a, b)).astype(p.dtype)
    dz = (g.astype(jnp.float32) * scale_g).astype(w.dtype)
    acc = jnp.dot(dz, w.T, preferred_element_type=jnp.float32) + jnp.dot(y, p, preferred_element_type=jnp.float32)
    dy = (acc + c).astype(out_dtype)
    if not sums:
        return dy
    g2, centred = relu_grad(x, dy, mean, a, b)
    return dy, jnp.stack([jnp.sum(g2, axis=0), jnp.sum(g2 * centred, axis=0)])


def _matmul_bn_add_relu_xla(x: Array, mean: Array, a: Array, b: Array, w: Array, a3: Array, b3: Array,
                            residual: Array) -> Array:
    z = jnp.dot(relu_bn(x, mean, a, b).astype(w.dtype), w, preferred_element_type=jnp.float32)
    return jnp.maximum(z * a3 + b3 + residual.astype(jnp.float32), 0.0).astype(residual.dtype)


def _matmul_bn_add_matmul_bn_relu_xla(x: Array, mean: Array, a: Array, b: Array, w: Array, a3: Array, b3: Array,
                                      xs: Array, ws: Array, a_s: Array, b_s: Array, out_dtype: Dtype) -> Array:
    z = jnp.dot(relu_bn(x, mean, a, b).astype(w.dtype), w, preferred_element_type=jnp.float32)
    zs = jnp.dot(xs, ws, preferred_element_type=jnp.float32)
    return jnp.maximum(z * a3 + b3 + (zs * a_s + b_s), 0.0).astype(out_dtype)


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
def _sharded_weight_grad(interpret: bool, affine: bool = False, prologue: bool = True,
                         masked: bool = False) -> Callable:
    """:func:`weight_grad` (or XLA's) as a :func:`row_sharded_op`: x's and dz's rows split over
    the devices, each device's (K, N) sum added across them. The op takes ``(x, mean, a, b, dz)``,
    without ``mean, a, b`` where not ``prologue``; ``affine``: ``g, z, scale_g, scale_z, shift``
    in place of dz, dz being :func:`affine_grad` of them; ``masked``: ``dout, out`` in place of dz,
    dz being dout where ``out > 0``, and the op returns ``(dw, dz, dz's column sums)``, dz split
    by rows like its inputs and the sums added across the devices."""
    if affine and masked:
        raise ValueError("_sharded_weight_grad: dz is an affine map or a masked gradient, not both")
    fn = functools.partial(_kernel_or_xla, functools.partial(weight_grad, interpret=interpret), _weight_grad_xla)
    bn_rows, bn_spec = ((False,) * 3, "k, k, k, ") if prologue else ((), "")
    dz_rows, dz_spec = (((True, True, False, False, False), "m n, m n, n, n, n") if affine else
                        ((True, True), "m n, m n") if masked else ((True,), "m n"))

    def call(x: Array, *args: Array) -> Any:
        bn, dz = (args[:3], args[3:]) if prologue else ((None,) * 3, args)
        return fn(x, *bn, tuple(dz) if affine or masked else dz[0])

    if masked:  # m is in an output too (dz), so Shardy is not told it is reduced
        return row_sharded_op(call, (True, *bn_rows, *dz_rows), (False, True, False),
                              f"m k, {bn_spec}{dz_spec} -> k n, m n, n")
    return row_sharded_op(call, (True, *bn_rows, *dz_rows), (False,), f"m k, {bn_spec}{dz_spec} -> k n", ("m",))


@functools.cache
def _sharded_input_grad(out_dtype: Dtype, interpret: bool, sums: bool = False) -> Callable:
    """:func:`input_grad` (or XLA's) as a :func:`row_sharded_op`: g's and z's rows split over the
    devices, dy split the same way; the vectors and the kernel replicated. ``sums``: the op
    takes ``(g, z, scale_g, scale_z, shift, w, x, mean, a, b)`` and also returns the sums of
    the BatchNorm + ReLU's gradient (``relu_bn_input``), added across the devices."""
    fn = functools.partial(_kernel_or_xla, functools.partial(input_grad, out_dtype=out_dtype, interpret=interpret),
                           functools.partial(_input_grad_xla, out_dtype=out_dtype))
    if not sums:
        return row_sharded_op(fn, (True, True, False, False, False, False), (True,), "m n, m n, n, n, n, k n -> m k")
    return row_sharded_op(lambda g, z, sg, sz, shift, w, *bn: fn(g, z, sg, sz, shift, w, tuple(bn)),
                          (True, True, False, False, False, False, True, False, False, False), (True, False),
                          "m n, m n, n, n, n, k n, m k, k, k, k -> m k, t k")


@functools.cache
def _sharded_forward_residual(interpret: bool) -> Callable:
    """:func:`matmul_bn_add_relu` (or XLA's) as a :func:`row_sharded_op`: x's and the residual's rows
    split over the devices, the output split the same way; the vectors and the kernel replicated."""
    fn = functools.partial(_kernel_or_xla, functools.partial(matmul_bn_add_relu, interpret=interpret),
                           _matmul_bn_add_relu_xla)
    return row_sharded_op(fn, (True, False, False, False, False, False, False, True), (True,),
                          "m k, k, k, k, k n, n, n, m n -> m n")


@functools.cache
def _sharded_forward_projection(out_dtype: Dtype, interpret: bool) -> Callable:
    """:func:`matmul_bn_add_matmul_bn_relu` (or XLA's) as a :func:`row_sharded_op`: x's and xs's rows
    split over the devices, the output split the same way; the vectors and both kernels replicated."""
    fn = functools.partial(_kernel_or_xla,
                           functools.partial(matmul_bn_add_matmul_bn_relu, out_dtype=out_dtype, interpret=interpret),
                           functools.partial(_matmul_bn_add_matmul_bn_relu_xla, out_dtype=out_dtype))
    return row_sharded_op(fn, (True, False, False, False, False, False, False, True, False, False, False), (True,),
                          "m k, k, k, k, k n, n, n, m j, j n, n, n -> m n")


@functools.cache
def _sharded_gram(interpret: bool, prologue: bool) -> Callable:
    """:func:`gram` (or XLA's) as a :func:`row_sharded_op`: x's rows split over the devices, each
    device's (K, K) product and (K,) column sums added across them. The op takes ``(x, mean,
    a, b)``, or ``(x,)`` where not ``prologue``."""
    fn = functools.partial(_kernel_or_xla, functools.partial(gram, interpret=interpret), _gram_xla)
    if prologue:
        return row_sharded_op(fn, (True, False, False, False), (False, False), "m k, k, k, k -> k u, k", ("m",))
    return row_sharded_op(lambda x: fn(x, None, None, None), (True,), (False, False), "m k -> k u, k", ("m",))


@functools.cache
def _sharded_input_grad_gram(out_dtype: Dtype, interpret: bool, prologue: bool, sums: bool) -> Callable:
    """:func:`input_grad_gram` (or XLA's) as a :func:`row_sharded_op`: g's and x's rows split over
    the devices, dy split the same way, the sums (``sums``) added across them; the vectors, w
    and p replicated. The op takes ``(g, scale_g, w, x, [mean, a, b,] p, c)``."""
    fn = functools.partial(_kernel_or_xla,
                           functools.partial(input_grad_gram, sums=sums, out_dtype=out_dtype, interpret=interpret),
                           functools.partial(_input_grad_gram_xla, sums=sums, out_dtype=out_dtype))
    bn_rows, bn_spec = ((False,) * 3, "k, k, k, ") if prologue else ((), "")

    def call(g: Array, scale_g: Array, w: Array, x: Array, *rest: Array) -> Any:
        bn, (p, c) = (rest[:3], rest[3:]) if prologue else ((None,) * 3, rest)
        return fn(g, scale_g, w, x, *bn, p, c)

    out_rows, out_spec = ((True, False), "m k, t k") if sums else ((True,), "m k")
    return row_sharded_op(call, (True, False, False, True, *bn_rows, False, False), out_rows,
                          f"m n, n, k n, m k, {bn_spec}k u, k -> {out_spec}")


def gram_backward(cts: tuple[Array, Array, Array], gemm_input: tuple[Array, ...], w: Array, mean3: Array,
                  inv3: Array, next_scale: Array, *, input_grad: bool, kernel_grad: bool, input_grad_sums: bool,
                  dtype: Dtype, interpret: bool, gram_of_input: tuple[Array, Array] | None = None,
                  relu_output: Array | None = None, g_sums: Array | None = None,
                  ) -> tuple[Array | None, Array | None, Array | None, tuple[Array, Array], tuple[Array, Array]]:
    """The reverse pass of a 1x1 convolution followed by a whole-batch BatchNorm (``z = y @ w``,
    ``u = (z - mean3) * inv3 * next_scale + bias``), from the cotangents of (u, z's mean, z's
    biased variance), without reading z (change 15; :func:`_bn_after_transpose` is the same
    map read from z). y is the GEMM's input: ``gemm_input = (x, mean, a, b)`` for ``relu_bn(x,
    ...)`` or ``(x,)``, x (M, K); w (K, N) in the compute dtype.

    With G = y^T g (the weight-gradient kernel, g = u's gradient), z's two gradient sums are
    ``sum(g)`` and ``sum(g * (z - mean3)) = sum_k w * G - mean3 sum(g)``, and z's gradient is
    ``dz = a3 g + scale_z z + shift`` per channel, so

    - ``dw = y^T dz = a3 G + scale_z (y^T y) w + sum(y) shift`` (:func:`gram`: one more pass
      over x, which is a quarter of z's width in a Bottleneck), and
    - ``dy = dz w^T = (a3 g) w^T + y (w diag(scale_z) w^T) + shift w^T``
      (:func:`input_grad_gram`: g and x read, not z).

    ``relu_output``: the (M, N) output of a ReLU after the BatchNorm (``relu(u + ...)``, changes
    16 and 17), whose cotangent ``cts[0]`` then is; g is that cotangent where the output is
    positive, else 0, and the weight-gradient kernel that takes y^T g computes it as it loads
    the two, stores it and sums it (:func:`weight_grad`'s ``(dout, out)``): g costs no pass of
    its own. ``g_sums``: g's float32 (N,) column sums, where the caller has them (a second GEMM
    fed the same g, change 17's shortcut), so that they are not summed again.

    Returns ``(dy, sums2, dw, (dscale3, dbias3), (g, g_sums))``: dy (M, K) in ``dtype`` or None where not
    ``input_grad``; ``sums2`` the BatchNorm + ReLU's backward sums from dy's epilogue where
    ``input_grad_sums`` (with a prologue), else None; dw float32 (K, N) or None where not
    ``kernel_grad``; the cotangents of the BatchNorm's scale and bias; and g, u's cotangent (M, N)
    as used (masked, with ``relu_output``), with its column sums. z's rounding to the
    compute dtype in the forward pass is not seen here (z = y @ w exactly): the two maps
    differ by that rounding, as the forward pass's statistics do from z's. ``gram_of_input``:
    :func:`gram`'s ``(y^T y, sum of y's rows)``, where the forward pass computed them."""
    du, dmean3, dvar3 = cts
    x = gemm_input[0]
    prologue = len(gemm_input) == 4
    rows, n = x.shape[0], w.shape[1]
    g = du.reshape(rows, n)
    if relu_output is None:
        sum_g = jnp.sum(g.astype(jnp.float32), axis=0) if g_sums is None else g_sums
        products = _sharded_weight_grad(interpret, prologue=prologue)(*gemm_input, g)  # y^T g, (K, N)
    else:  # the ReLU's mask from its output, applied (and g stored and summed) by the y^T g kernel
        products, g, sum_g = _sharded_weight_grad(interpret, prologue=prologue, masked=True)(
            *gemm_input, g, relu_output.reshape(rows, n))
    wf = w.astype(jnp.float32)
    sum_gc = jnp.sum(wf * products, axis=0) - mean3 * sum_g
    a3 = inv3 * next_scale
    scale_z = (2 * dvar3 - a3 * inv3**2 * sum_gc) / rows
    shift = (dmean3 - a3 * sum_g) / rows - scale_z * mean3
    highest = jax.lax.Precision.HIGHEST
    dy = sums2 = dw = None
    if kernel_grad:
        gram_yy, sum_y = gram_of_input or _sharded_gram(interpret, prologue)(*gemm_input)
        dw = a3 * products + scale_z * jnp.dot(gram_yy, wf, precision=highest) + sum_y[:, None] * shift
    if input_grad:
        p = jnp.dot(wf * scale_z, wf.T, precision=highest).astype(w.dtype)
        c = jnp.dot(wf, shift, precision=highest)
        out = _sharded_input_grad_gram(jnp.dtype(dtype), interpret, prologue, input_grad_sums)(
            g, a3, w, *gemm_input, p, c)
        dy, sums2 = out if input_grad_sums else (out, None)
    return dy, sums2, dw, (sum_gc * inv3, sum_g), (g, sum_g)


def _gram_transpose_of_gemm_bn(cts: tuple[Array, Array, Array], x: Array, kernel: Array, xs: Array, w: Array,
                               mean: Array, inv: Array, scale: Array, present: tuple[bool, ...], dtype: Dtype,
                               interpret: bool, gram_of_input: tuple[Array, Array] | None = None,
                               g_sums: Array | None = None) -> list[Array]:
    """The cotangents of the inputs marked ``present`` (x, the kernel, the BatchNorm's scale and bias)
    of ``BatchNorm(x @ kernel)`` by :func:`gram_backward` (z not read), from those of its output and
    z's statistics; ``xs`` (M, K) and ``w`` (K, N) are x and the kernel as the GEMM takes them, x
    and ``kernel`` give the cotangents' shapes and dtypes. Shared by change 15's path of
    :func:`conv1x1_bn` and the shortcut of :func:`bn_relu_conv1x1_bn_add_conv1x1_bn_relu`."""
    (x_present, kernel_present), bn_present = present[:2], present[2:]
    dx, _, dw, bn_cts, _ = gram_backward(cts, (xs,), w, mean, inv, scale, input_grad=x_present,
                                         kernel_grad=kernel_present, input_grad_sums=False, dtype=dtype,
                                         interpret=interpret, gram_of_input=gram_of_input, g_sums=g_sums)
    out = [dx.reshape(x.shape).astype(x.dtype)] if x_present else []
    if kernel_present:
        out.append(dw.reshape(kernel.shape).astype(kernel.dtype))
    out.extend(ct for ct, p in zip(bn_cts, bn_present) if p)
    return out


def _gram_transpose_of_bn_relu_gemm_bn(cts: tuple[Array, Array, Array], res5: tuple, kernel: Array, w: Array,
                                       mean3: Array, inv3: Array, next_scale: Array, present: tuple[bool, ...],
                                       epsilon: float, dtype: Dtype, interpret: bool,
                                       gram_of_input: tuple[Array, Array] | None = None,
                                       relu_output: Array | None = None) -> tuple[list[Array], tuple[Array, Array]]:
    """The cotangents of the inputs marked ``present`` (x, mean, var, scale, bias; the kernel; the
    next BatchNorm's scale and bias) of ``BatchNorm'(relu(BatchNorm(x)) @ kernel)``, from those of
    its output and z's statistics, by :func:`gram_backward` (z not read) and the Pallas
    BatchNorm's transpose; ``res5 = (x, mean, var, scale, bias)``. With ``relu_output``, the
    output's cotangent is that of a ReLU after it (:func:`gram_backward`). Returns the cotangents
    and ``(g, g's column sums)``, the output's cotangent as used, (M, N). Shared by change 15's path of
    :func:`bn_relu_conv1x1_bn` and by changes 16 and 17's ops."""
    x, mean, var, scale, bias = res5
    bn_present, kernel_present, next_present = present[:5], present[5], present[6:8]
    n_bn = sum(bn_present)
    bn_input = (x.reshape(-1, x.shape[-1]), mean, jax.lax.rsqrt(var + epsilon) * scale, bias.astype(jnp.float32))
    sums_wanted = bool(n_bn) and INPUT_GRAD_SUMS and any(bn_present[1:])
    dy, sums2, dw, next_cts, g_and_sums = gram_backward(
        cts, bn_input, w, mean3, inv3, next_scale, input_grad=bool(n_bn), kernel_grad=kernel_present,
        input_grad_sums=sums_wanted, dtype=dtype, interpret=interpret, gram_of_input=gram_of_input,
        relu_output=relu_output)
    out = []
    if n_bn:
        out.extend(_bn_relu_transpose(epsilon, interpret, bn_present, res5, dy.reshape(x.shape), sums2))
    if kernel_present:
        out.append(dw.reshape(kernel.shape).astype(kernel.dtype))
    out.extend(ct for ct, p in zip(next_cts, next_present) if p)
    return out, g_and_sums


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
    from resnet_jax.models.layers import conv1x1  # the convolution as nn.Conv computes it

    (x, kernel), (tx, tkernel) = primals, tangents
    z, sums = _conv1x1_sums(x, kernel, dtype, interpret)
    as_hwio = (1, 1, x.shape[-1], -1)
    # linear in (tx, tkernel): reverse mode transposes these two convolutions as it does nn.Conv's
    tz = conv1x1(tx, kernel.reshape(as_hwio), dtype) + conv1x1(x, tkernel.reshape(as_hwio), dtype)
    return (z, sums), (tz, jnp.zeros_like(sums))


# ---------------------------------------------------------------- bn2 + ReLU, conv3 and bn3 whole
def bn_relu_conv1x1_bn(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                       next_scale: Array, next_bias: Array, epsilon: float, next_epsilon: float, dtype: Dtype,
                       interpret: bool = False) -> tuple[Array, Array, Array]:
    """``u = BatchNorm'(conv1x1(relu(BatchNorm(x)), kernel))`` in training: :func:`bn_relu_conv1x1`
    followed by the next BatchNorm (``next_scale``, ``next_bias``, ``next_epsilon``) with z's
    whole-batch statistics, as one differentiable op whose backward pass never stores z's
    gradient.

    x is (..., K) in the compute ``dtype``; ``mean``, ``var`` x's float32 (K,) batch statistics,
    ``scale``, ``bias`` its BatchNorm's (K,); ``kernel`` (K, N) or (1, 1, K, N); ``next_scale``
    and ``next_bias`` (N,). Returns u (..., N) in ``dtype`` and z's float32 (N,) mean and biased
    variance (for the next BatchNorm's running statistics; they carry their derivative too).

    Forward: :func:`matmul_moments` (z and its sums in one kernel), then u in XLA (which fuses
    it with whatever follows: in a Bottleneck, the residual add and ReLU). Reverse: the next
    BatchNorm's gradient is an affine function of u's gradient g and z per channel, so g's two
    sums are reduced in XLA (which fuses them into the kernel that makes g) and the two GEMMs
    that need dz, :func:`input_grad` and :func:`weight_grad`, compute it as they load g and z:
    dz is never written or read (docs/performance.md, change 11); with ``GRAM_BACKWARD``, z is
    not read either (:func:`gram_backward`). The variance's clip at zero is left out of the
    derivative (as where it does not bind). First-order forward and reverse mode work;
    second-order derivatives do not (``linear_call``)."""
    return _bn_relu_conv1x1_bn(x, mean, var, scale, bias, kernel, next_scale, next_bias, epsilon, next_epsilon,
                               dtype, interpret)


def _bn3_from_sums(z: Array, sums: Array, next_scale: Array, next_bias: Array, next_epsilon: float,
                   dtype: Dtype) -> tuple[Array, Array, Array, Array]:
    """u in ``dtype``, z's mean and biased variance from its row sums, and 1 / std."""
    rows = z.shape[0]
    mean3 = sums[0] / rows
    var3 = jnp.maximum(sums[1] / rows - mean3 * mean3, 0.0)
    inv3 = jax.lax.rsqrt(var3 + next_epsilon)
    u = ((z.astype(jnp.float32) - mean3) * (inv3 * next_scale) + next_bias).astype(dtype)
    return u, mean3, var3, inv3


def _bn_after_tangent(tz: Array, z: Array, mean3: Array, inv3: Array, next_scale: Array,
                      next_present: tuple[bool, bool], next_tangents: tuple) -> tuple[Array, Array, Array]:
    """The tangents of the BatchNorm after the GEMM (u, z's mean and biased variance), float32,
    from z's float32 tangent tz (M, N) and those of its scale and bias where ``next_present``."""
    centred = z.astype(jnp.float32) - mean3
    tmean3 = jnp.mean(tz, axis=0)
    tvar3 = jnp.mean(2 * centred * tz, axis=0)
    tu = ((tz - tmean3) * inv3 - centred * (0.5 * inv3**3 * tvar3)) * next_scale
    it = iter(next_tangents)
    tscale3, tbias3 = (next(it) if p else None for p in next_present)
    if tscale3 is not None:
        tu = tu + centred * inv3 * tscale3
    if tbias3 is not None:
        tu = tu + tbias3
    return tu, tmean3, tvar3


def _bn_after_transpose(cts: tuple[Array, Array, Array], z: Array, mean3: Array, inv3: Array,
                        next_scale: Array) -> tuple[tuple[Array, ...], tuple[Array, Array]]:
    """The reverse pass of the BatchNorm after the GEMM, from the cotangents of (u, z's mean, z's
    biased variance): ``(g, z, scale_g, scale_z, shift)``, whose :func:`affine_grad` is z's
    gradient (for the GEMM kernels to compute as they load g and z), and the cotangents of the
    BatchNorm's scale and bias. g's two sums are plain reductions, which XLA can fuse into the
    kernel that makes g (in the ResNet-50 step it does for bn3; for the shortcut's BatchNorm,
    change 13, it keeps them in a pass of their own)."""
    du, dmean3, dvar3 = cts
    rows = z.shape[0]
    g = du.reshape(z.shape)
    gf, centred = g.astype(jnp.float32), z.astype(jnp.float32) - mean3
    sum_g, sum_gc = jnp.sum(gf, axis=0), jnp.sum(gf * centred, axis=0)
    a3 = inv3 * next_scale
    # dz = a3 g - a3 mean(g) - a3 inv3^2 (z - mean3) mean(g (z - mean3)) + dmean3 / M + 2 dvar3 (z - mean3) / M
    scale_z = (2 * dvar3 - a3 * inv3**2 * sum_gc) / rows
    shift = (dmean3 - a3 * sum_g) / rows - scale_z * mean3
    return (g, z, a3, scale_z, shift), (sum_gc * inv3, sum_g)


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9, 10, 11))
def _bn_relu_conv1x1_bn(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                        next_scale: Array, next_bias: Array, epsilon: float, next_epsilon: float, dtype: Dtype,
                        interpret: bool = False) -> tuple[Array, Array, Array]:
    z, sums = _bn_relu_conv1x1(x, mean, var, scale, bias, kernel, epsilon, dtype, interpret)
    z = z.reshape(-1, z.shape[-1])
    u, mean3, var3, _ = _bn3_from_sums(z, sums, next_scale, next_bias, next_epsilon, dtype)
    return u.reshape(*x.shape[:-1], z.shape[-1]), mean3, var3


def _bn_relu_conv1x1_bn_jvp(epsilon: float, next_epsilon: float, dtype: Dtype, interpret: bool, primals: tuple,
                            tangents: tuple) -> tuple[tuple, tuple]:
    x, mean, var, scale, bias, kernel, next_scale, next_bias = primals
    k = x.shape[-1]
    z, sums = _bn_relu_conv1x1(x, mean, var, scale, bias, kernel, epsilon, dtype, interpret)
    z = z.reshape(-1, z.shape[-1])
    u, mean3, var3, inv3 = _bn3_from_sums(z, sums, next_scale, next_bias, next_epsilon, dtype)
    present, linear = present_tangents(tangents)
    bn_present, kernel_present, next_present = present[:5], present[5], present[6:]
    n_bn = sum(bn_present)
    res = (x, mean, var, scale, bias, kernel, next_scale, z, mean3, inv3)

    def tangent(res: tuple, lin: tuple) -> tuple[Array, Array, Array]:
        x, mean, var, scale, bias, kernel, next_scale, z, mean3, inv3 = res
        w = kernel.reshape(k, -1).astype(dtype)
        tz = jnp.zeros(z.shape, jnp.float32)
        if n_bn:
            ty = _bn_relu_tangent(epsilon, dtype, bn_present, res[:5], lin[:n_bn]).reshape(-1, k)
            tz = tz + jnp.dot(ty, w, preferred_element_type=jnp.float32)
        if kernel_present:
            y = relu_bn(x.reshape(-1, k), mean, jax.lax.rsqrt(var + epsilon) * scale, bias).astype(dtype)
            tz = tz + jnp.dot(y, lin[n_bn].reshape(w.shape).astype(dtype), preferred_element_type=jnp.float32)
        tu, tmean3, tvar3 = _bn_after_tangent(tz, z, mean3, inv3, next_scale, next_present,
                                              lin[n_bn + kernel_present:])
        return tu.astype(dtype).reshape(*x.shape[:-1], -1), tmean3, tvar3

    def transpose(res: tuple, cts: tuple) -> tuple:
        x, mean, var, scale, bias, kernel, next_scale, z, mean3, inv3 = res
        w = kernel.reshape(k, -1).astype(dtype)
        if GRAM_BACKWARD:  # change 15: z not read
            return tuple(_gram_transpose_of_bn_relu_gemm_bn(cts, res[:5], kernel, w, mean3, inv3, next_scale, present,
                                                            epsilon, dtype, interpret)[0])
        # bn2 + ReLU, the GEMMs' input: (x, mean, a, b)
        bn_input = (x.reshape(-1, k), mean, jax.lax.rsqrt(var + epsilon) * scale, bias.astype(jnp.float32))
        affine, next_cts = _bn_after_transpose(cts, z, mean3, inv3, next_scale)
        out = []
        if n_bn:
            sums2 = None
            if INPUT_GRAD_SUMS and any(bn_present[1:]):
                # bn2's two backward sums in the input gradient's epilogue (change 12): x read
                # there once instead of x and dy again by relu_grad_sums
                dy, sums2 = _sharded_input_grad(jnp.dtype(dtype), interpret, sums=True)(*affine, w, *bn_input)
            else:
                dy = _sharded_input_grad(jnp.dtype(dtype), interpret)(*affine, w)
            out.extend(_bn_relu_transpose(epsilon, interpret, bn_present, res[:5], dy.reshape(x.shape), sums2))
        if kernel_present:
            dw = _sharded_weight_grad(interpret, affine=True)(*bn_input, *affine)
            out.append(dw.reshape(kernel.shape).astype(kernel.dtype))
        out.extend(ct for ct, p in zip(next_cts, next_present) if p)
        return tuple(out)

    outs = jax.custom_derivatives.linear_call(tangent, transpose, res, linear)
    return (u.reshape(*x.shape[:-1], -1), mean3, var3), outs


_bn_relu_conv1x1_bn.defjvp(_bn_relu_conv1x1_bn_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------- ... and the residual add and ReLU after bn3
def bn_relu_conv1x1_bn_add_relu(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                                next_scale: Array, next_bias: Array, residual: Array, epsilon: float,
                                next_epsilon: float, dtype: Dtype,
                                interpret: bool = False) -> tuple[Array, Array, Array]:
    """``relu(u + residual)`` with u as :func:`bn_relu_conv1x1_bn`'s: a Bottleneck's bn2 + ReLU,
    conv3, bn3, the residual add and the ReLU in training, as one differentiable op that never
    stores z (change 16).

    x is (..., K) in the compute ``dtype``, ``residual`` (..., N) (the shortcut, cast to
    ``dtype``); the rest as :func:`bn_relu_conv1x1_bn`. Returns the block's output (..., N) in
    ``dtype`` and z's float32 (N,) mean and biased variance (for bn3's running statistics;
    they carry their derivative too).

    Forward: z = y @ w (y = relu(bn2(x))), so z's statistics are ``sum(y) w / M`` and
    ``colsum(w * (y^T y) w) / M - mean^2``: :func:`gram` gives ``y^T y`` and y's column sums in
    one pass over x (a quarter of z's width), and then :func:`matmul_bn_add_relu`'s epilogue
    applies bn3, adds the residual and applies the ReLU as the GEMM stores its output: z is
    neither written nor read. The statistics are those of z as the GEMM computes it, in float32
    (the model's are those of z rounded to ``dtype``). Reverse: the ReLU's mask from the output,
    then :func:`gram_backward` with the forward pass's ``y^T y``; the residual's gradient is
    the masked one. First-order forward and reverse mode work (forward mode recomputes z);
    second-order derivatives do not (``linear_call``)."""
    return _bn_relu_conv1x1_bn_add_relu(x, mean, var, scale, bias, kernel, next_scale, next_bias, residual, epsilon,
                                        next_epsilon, dtype, interpret)


def _statistics_from_gram(gram_yy: Array, sum_y: Array, w: Array, rows: int) -> tuple[Array, Array]:
    """z = y @ w's float32 (N,) mean and biased variance from y^T y (K, K) and y's column sums."""
    wf = w.astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    mean3 = jnp.dot(sum_y, wf, precision=highest) / rows
    mean_sq3 = jnp.sum(wf * jnp.dot(gram_yy, wf, precision=highest), axis=0) / rows
    return mean3, jnp.maximum(mean_sq3 - mean3 * mean3, 0.0)


def _batch_norm_from_gram(gram_of_input: tuple[Array, Array], w: Array, rows: int, scale: Array, bias: Array,
                          epsilon: float) -> tuple[Array, Array, Array, Array, Array]:
    """The whole-batch BatchNorm of z = y @ w from :func:`gram`'s ``(y^T y, sum of y's rows)``: z's
    float32 (N,) mean, biased variance and 1 / std, and the per-channel affine map a GEMM's
    epilogue applies, ``z * a + shift``."""
    mean, var = _statistics_from_gram(*gram_of_input, w, rows)
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv * scale
    return mean, var, inv, a, bias - mean * a


def _residual_forward(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                      next_scale: Array, next_bias: Array, residual: Array, epsilon: float, next_epsilon: float,
                      dtype: Dtype, interpret: bool) -> tuple:
    k = x.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    bn_input = (x.reshape(-1, k), mean, jax.lax.rsqrt(var + epsilon) * scale, bias.astype(jnp.float32))
    gram_of_input = _sharded_gram(interpret, True)(*bn_input)
    mean3, var3, inv3, a3, shift3 = _batch_norm_from_gram(gram_of_input, w, bn_input[0].shape[0], next_scale,
                                                          next_bias, next_epsilon)
    out = _sharded_forward_residual(interpret)(*bn_input, w, a3, shift3, residual.reshape(-1, w.shape[1]).astype(dtype))
    return out.reshape(*x.shape[:-1], -1), mean3, var3, inv3, w, bn_input, gram_of_input


def _tail_tangent(epsilon: float, dtype: Dtype, present: tuple[bool, ...], res7: tuple, mean3: Array, inv3: Array,
                  lin: tuple) -> tuple[Array, Array, Array]:
    """The float32 tangents of ``u = BatchNorm'(relu(BatchNorm(x)) @ kernel)`` (M, N) and of z's mean
    and biased variance, for the tangents ``lin`` of the inputs marked ``present`` among
    ``res7 = (x, mean, var, scale, bias, kernel, next_scale)`` and the next BatchNorm's bias (the
    first eight of the tail ops' inputs; ``lin`` may go on past them). Forward mode recomputes z."""
    x, mean, var, scale, bias, kernel, next_scale = res7
    bn_present, kernel_present, next_present = present[:5], present[5], present[6:8]
    n_bn, k = sum(bn_present), x.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    y = relu_bn(x.reshape(-1, k), mean, jax.lax.rsqrt(var + epsilon) * scale, bias).astype(dtype)
    z = jnp.dot(y, w, preferred_element_type=jnp.float32)
    tz = jnp.zeros(z.shape, jnp.float32)
    if n_bn:
        ty = _bn_relu_tangent(epsilon, dtype, bn_present, res7[:5], lin[:n_bn]).reshape(-1, k)
        tz = tz + jnp.dot(ty, w, preferred_element_type=jnp.float32)
    if kernel_present:
        tz = tz + jnp.dot(y, lin[n_bn].reshape(w.shape).astype(dtype), preferred_element_type=jnp.float32)
    start = n_bn + kernel_present
    return _bn_after_tangent(tz, z, mean3, inv3, next_scale, next_present, lin[start:start + sum(next_present)])


@functools.partial(jax.custom_jvp, nondiff_argnums=(9, 10, 11, 12))
def _bn_relu_conv1x1_bn_add_relu(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                                 next_scale: Array, next_bias: Array, residual: Array, epsilon: float,
                                 next_epsilon: float, dtype: Dtype,
                                 interpret: bool = False) -> tuple[Array, Array, Array]:
    out, mean3, var3, *_ = _residual_forward(x, mean, var, scale, bias, kernel, next_scale, next_bias, residual,
                                             epsilon, next_epsilon, dtype, interpret)
    return out, mean3, var3


def _bn_relu_conv1x1_bn_add_relu_jvp(epsilon: float, next_epsilon: float, dtype: Dtype, interpret: bool,
                                     primals: tuple, tangents: tuple) -> tuple[tuple, tuple]:
    x, mean, var, scale, bias, kernel, next_scale, next_bias, residual = primals
    k = x.shape[-1]
    out, mean3, var3, inv3, w, bn_input, gram_of_input = _residual_forward(*primals, epsilon, next_epsilon, dtype,
                                                                             interpret)
    present, linear = present_tangents(tangents)
    residual_present = present[8]
    res = (x, mean, var, scale, bias, kernel, next_scale, out, mean3, inv3, *gram_of_input)

    def tangent(res: tuple, lin: tuple) -> tuple[Array, Array, Array]:
        out, mean3, inv3 = res[7:10]
        tu, tmean3, tvar3 = _tail_tangent(epsilon, dtype, present[:8], res[:7], mean3, inv3, lin)
        if residual_present:
            tu = tu + lin[-1].reshape(tu.shape).astype(jnp.float32)
        tout = jnp.where(out.reshape(tu.shape) > 0, tu, 0.0)
        return tout.astype(dtype).reshape(out.shape), tmean3, tvar3

    def transpose(res: tuple, cts: tuple) -> tuple:
        x, mean, var, scale, bias, kernel, next_scale, out, mean3, inv3, gram_yy, sum_y = res
        w = kernel.reshape(k, -1).astype(dtype)
        # the ReLU's mask from its output, applied by the kernel that takes y^T g (g stored there)
        outs, (g, _) = _gram_transpose_of_bn_relu_gemm_bn(cts, res[:5], kernel, w, mean3, inv3, next_scale,
                                                          present, epsilon, dtype, interpret,
                                                          gram_of_input=(gram_yy, sum_y), relu_output=out)
        if residual_present:
            outs.append(g.reshape(residual.shape).astype(residual.dtype))
        return tuple(outs)

    outs = jax.custom_derivatives.linear_call(tangent, transpose, res, linear)
    return (out, mean3, var3), outs


_bn_relu_conv1x1_bn_add_relu.defjvp(_bn_relu_conv1x1_bn_add_relu_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------- ... with a projection shortcut beside it
def bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
    x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array, next_scale: Array,
    next_bias: Array, shortcut_input: Array, shortcut_kernel: Array, shortcut_scale: Array, shortcut_bias: Array,
    epsilon: float, next_epsilon: float, shortcut_epsilon: float, dtype: Dtype, interpret: bool = False,
) -> tuple[Array, Array, Array, Array, Array]:
    """``relu(u + BatchNorm_s(conv1x1(shortcut_input, shortcut_kernel)))`` in training, with u as
    :func:`bn_relu_conv1x1_bn`'s: a projection Bottleneck's bn2 + ReLU, conv3, bn3, its projection
    shortcut (a 1x1 convolution and a BatchNorm, :func:`conv1x1_bn`), the add and the ReLU as
    one differentiable op that stores neither z nor the shortcut's z (change 17).

    x is (..., K) in the compute ``dtype``, ``shortcut_input`` (..., Ks) with as many positions
    (for a stride-s projection, every s-th pixel of the block's input; ResNet-D's after the
    average pool), ``shortcut_kernel`` (Ks, N) or (1, 1, Ks, N), the shortcut BatchNorm's
    ``shortcut_scale`` and ``shortcut_bias`` float32 (N,); the rest as
    :func:`bn_relu_conv1x1_bn_add_relu`. Returns the block's output (..., N) in ``dtype``, z's
    float32 (N,) mean and biased variance and the shortcut's (for the two running statistics;
    they carry their derivatives too).

    Forward: both BatchNorms' statistics from :func:`gram` (one pass over x and one over the
    shortcut's input, each narrower than the output), then :func:`matmul_bn_add_matmul_bn_relu`
    computes both GEMMs and stores only the output. Reverse: the ReLU's mask from the output,
    then :func:`gram_backward` for each branch with the forward pass's Gram matrices. First-order
    forward and reverse mode work; second-order derivatives do not (``linear_call``)."""
    return _bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
        x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut_input, shortcut_kernel, shortcut_scale,
        shortcut_bias, epsilon, next_epsilon, shortcut_epsilon, dtype, interpret)


def _projection_forward(x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array,
                        next_scale: Array, next_bias: Array, xs: Array, kernel_s: Array, scale_s: Array,
                        bias_s: Array, epsilon: float, next_epsilon: float, epsilon_s: float, dtype: Dtype,
                        interpret: bool) -> tuple:
    k, ks = x.shape[-1], xs.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    ws = kernel_s.reshape(ks, -1).astype(dtype)
    bn_input = (x.reshape(-1, k), mean, jax.lax.rsqrt(var + epsilon) * scale, bias.astype(jnp.float32))
    xs_rows = xs.reshape(-1, ks).astype(dtype)
    if xs_rows.shape[0] != bn_input[0].shape[0]:
        raise ValueError(f"the shortcut's input has {xs_rows.shape[0]} positions and x {bn_input[0].shape[0]}: "
                         "give the shortcut every s-th pixel of the block's input for a stride-s projection")
    gram_of_input = _sharded_gram(interpret, True)(*bn_input)
    gram_of_shortcut = _sharded_gram(interpret, False)(xs_rows)
    rows = xs_rows.shape[0]
    mean3, var3, inv3, a3, shift3 = _batch_norm_from_gram(gram_of_input, w, rows, next_scale, next_bias, next_epsilon)
    mean_s, var_s, inv_s, a_s, shift_s = _batch_norm_from_gram(gram_of_shortcut, ws, rows, scale_s, bias_s, epsilon_s)
    out = _sharded_forward_projection(jnp.dtype(dtype), interpret)(*bn_input, w, a3, shift3, xs_rows, ws, a_s,
                                                                   shift_s)
    return (out.reshape(*x.shape[:-1], -1), mean3, var3, mean_s, var_s, inv3, inv_s, xs_rows, ws, gram_of_input,
            gram_of_shortcut)


@functools.partial(jax.custom_jvp, nondiff_argnums=(12, 13, 14, 15, 16))
def _bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
    x: Array, mean: Array, var: Array, scale: Array, bias: Array, kernel: Array, next_scale: Array,
    next_bias: Array, xs: Array, kernel_s: Array, scale_s: Array, bias_s: Array, epsilon: float,
    next_epsilon: float, epsilon_s: float, dtype: Dtype, interpret: bool = False,
) -> tuple[Array, Array, Array, Array, Array]:
    return _projection_forward(x, mean, var, scale, bias, kernel, next_scale, next_bias, xs, kernel_s, scale_s,
                               bias_s, epsilon, next_epsilon, epsilon_s, dtype, interpret)[:5]


def _bn_relu_conv1x1_bn_add_conv1x1_bn_relu_jvp(epsilon: float, next_epsilon: float, epsilon_s: float, dtype: Dtype,
                                                interpret: bool, primals: tuple, tangents: tuple) -> tuple:
    x, mean, var, scale, bias, kernel, next_scale, next_bias, xs, kernel_s, scale_s, bias_s = primals
    (out, mean3, var3, mean_s, var_s, inv3, inv_s, xs_rows, ws, gram_of_input,
     gram_of_shortcut) = _projection_forward(*primals, epsilon, next_epsilon, epsilon_s, dtype, interpret)
    present, linear = present_tangents(tangents)
    xs_present, kernel_s_present, bn_s_present = present[8], present[9], present[10:12]
    res = (x, mean, var, scale, bias, kernel, next_scale, out, mean3, inv3, xs_rows, ws, scale_s, mean_s, inv_s,
           *gram_of_input, *gram_of_shortcut)

    def tangent(res: tuple, lin: tuple) -> tuple[Array, ...]:
        out, mean3, inv3, xs_rows, ws, scale_s, mean_s, inv_s = res[7:15]
        tu, tmean3, tvar3 = _tail_tangent(epsilon, dtype, present[:8], res[:7], mean3, inv3, lin)
        it = iter(lin[sum(present[:8]):])
        zs = jnp.dot(xs_rows, ws, preferred_element_type=jnp.float32)  # forward mode recomputes it
        tzs = jnp.zeros(zs.shape, jnp.float32)
        if xs_present:
            tzs = tzs + jnp.dot(next(it).reshape(xs_rows.shape).astype(dtype), ws, preferred_element_type=jnp.float32)
        if kernel_s_present:
            tzs = tzs + jnp.dot(xs_rows, next(it).reshape(ws.shape).astype(dtype),
                                preferred_element_type=jnp.float32)
        tus, tmean_s, tvar_s = _bn_after_tangent(tzs, zs, mean_s, inv_s, scale_s, bn_s_present, tuple(it))
        tout = jnp.where(out.reshape(tu.shape) > 0, tu + tus, 0.0)
        return tout.astype(dtype).reshape(out.shape), tmean3, tvar3, tmean_s, tvar_s

    def transpose(res: tuple, cts: tuple) -> tuple:
        kernel, next_scale = res[5:7]
        out, mean3, inv3, xs_rows, ws, scale_s, mean_s, inv_s, gram_yy, sum_y, gram_ss, sum_s = res[7:]
        dout, dmean3, dvar3, dmean_s, dvar_s = cts
        w = kernel.reshape(x.shape[-1], -1).astype(dtype)
        # the ReLU's mask from its output, applied by the kernel that takes y^T g (g stored there)
        outs, (g, sum_g) = _gram_transpose_of_bn_relu_gemm_bn((dout, dmean3, dvar3), res[:5], kernel, w, mean3,
                                                              inv3, next_scale, present[:8], epsilon, dtype,
                                                              interpret, gram_of_input=(gram_yy, sum_y),
                                                              relu_output=out)
        outs += _gram_transpose_of_gemm_bn((g, dmean_s, dvar_s), xs, kernel_s, xs_rows, ws, mean_s, inv_s, scale_s,
                                           present[8:], dtype, interpret, gram_of_input=(gram_ss, sum_s),
                                           g_sums=sum_g)
        return tuple(outs)

    outs = jax.custom_derivatives.linear_call(tangent, transpose, res, linear)
    return (out, mean3, var3, mean_s, var_s), outs


_bn_relu_conv1x1_bn_add_conv1x1_bn_relu.defjvp(_bn_relu_conv1x1_bn_add_conv1x1_bn_relu_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------- a 1x1 convolution and its BatchNorm whole
def conv1x1_bn(x: Array, kernel: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
               interpret: bool = False) -> tuple[Array, Array, Array]:
    """``u = BatchNorm(conv1x1(x, kernel))`` in training (whole-batch statistics, no activation), as
    one differentiable op: a ResNet's projection shortcut (``layers.FUSE_SHORTCUT``; a stride-s
    one given every s-th pixel of its input; ResNet-D's and ResNet-RS's after the average pool).

    x is (..., K) NHWC, ``kernel`` (K, N) or (1, 1, K, N), both cast to ``dtype`` like flax's
    ``Conv``; ``scale`` and ``bias`` the BatchNorm's float32 (N,). Returns u (..., N) in
    ``dtype`` and z's float32 (N,) mean and biased variance (for the running statistics; they
    carry their derivative too).

    Forward: :func:`matmul_moments` without a prologue (z and its sums in one kernel, as
    :func:`conv1x1_moments`), then u in XLA, fused with what follows (the residual add and
    ReLU). Reverse: as :func:`bn_relu_conv1x1_bn`'s, the BatchNorm's gradient is computed by
    the input- and weight-gradient GEMMs (:func:`input_grad`, :func:`weight_grad`) as they load
    u's gradient and z, never stored (docs/performance.md, change 13); g's two sums are plain
    reductions (in the ResNet-50 step XLA runs them as a pass over g and z of their own, not
    in the residual ReLU's backward kernel that makes g); with ``GRAM_BACKWARD``, z is not read
    (:func:`gram_backward`). First-order forward and reverse mode work; second-order
    derivatives do not (``linear_call``). Shapes the kernels do not take run in XLA."""
    return _conv1x1_bn(x, kernel, scale, bias, epsilon, dtype, interpret)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _conv1x1_bn(x: Array, kernel: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
                interpret: bool = False) -> tuple[Array, Array, Array]:
    k = x.shape[-1]
    w = kernel.reshape(k, -1).astype(dtype)
    z, sums = _sharded_forward(jnp.dtype(dtype), interpret, prologue=False)(x.reshape(-1, k).astype(dtype), w)
    u, mean, var, _ = _bn3_from_sums(z, sums, scale, bias, epsilon, dtype)
    return u.reshape(*x.shape[:-1], -1), mean, var


def _conv1x1_bn_jvp(epsilon: float, dtype: Dtype, interpret: bool, primals: tuple, tangents: tuple) -> tuple:
    x, kernel, scale, bias = primals
    k = x.shape[-1]
    xs = x.reshape(-1, k).astype(dtype)
    w = kernel.reshape(k, -1).astype(dtype)
    z, sums = _sharded_forward(jnp.dtype(dtype), interpret, prologue=False)(xs, w)
    u, mean, var, inv = _bn3_from_sums(z, sums, scale, bias, epsilon, dtype)
    present, linear = present_tangents(tangents)
    (x_present, kernel_present), bn_present = present[:2], present[2:]
    res = (xs, w, scale, z, mean, inv)

    def tangent(res: tuple, lin: tuple) -> tuple[Array, Array, Array]:
        xs, w, scale, z, mean, inv = res
        it = iter(lin)
        tz = jnp.zeros(z.shape, jnp.float32)
        if x_present:
            tz = tz + jnp.dot(next(it).reshape(xs.shape).astype(dtype), w, preferred_element_type=jnp.float32)
        if kernel_present:
            tz = tz + jnp.dot(xs, next(it).reshape(w.shape).astype(dtype), preferred_element_type=jnp.float32)
        tu, tmean, tvar = _bn_after_tangent(tz, z, mean, inv, scale, bn_present, tuple(it))
        return tu.astype(dtype).reshape(*x.shape[:-1], -1), tmean, tvar

    def transpose(res: tuple, cts: tuple) -> tuple:
        xs, w, scale, z, mean, inv = res
        if GRAM_BACKWARD:  # change 15: z not read
            return tuple(_gram_transpose_of_gemm_bn(cts, x, kernel, xs, w, mean, inv, scale, present, dtype,
                                                    interpret))
        affine, bn_cts = _bn_after_transpose(cts, z, mean, inv, scale)
        out = []
        if x_present:
            dx = _sharded_input_grad(jnp.dtype(dtype), interpret)(*affine, w)
            out.append(dx.reshape(x.shape).astype(x.dtype))
        if kernel_present:
            dw = _sharded_weight_grad(interpret, affine=True, prologue=False)(xs, *affine)
            out.append(dw.reshape(kernel.shape).astype(kernel.dtype))
        out.extend(ct for ct, p in zip(bn_cts, bn_present) if p)
        return tuple(out)

    outs = jax.custom_derivatives.linear_call(tangent, transpose, res, linear)
    return (u.reshape(*x.shape[:-1], -1), mean, var), outs


_conv1x1_bn.defjvp(_conv1x1_bn_jvp, symbolic_zeros=True)
