"""BatchNorm in training mode with its reductions in hand-written (Pallas) GPU kernels.

What ``layers.BatchNorm`` runs, with whole-batch statistics, where the step is compiled for an
NVIDIA GPU (``layers._batch_norm_train`` picks it through ``jax.lax.platform_dependent``;
TPUs and CPUs keep plain XLA). Timed on an H100 (jax 0.11.2, docs/performance.md), the
ResNet-50 step at batch 256 in bf16 ran 1.044x faster with both kernels than with XLA's
reductions, at the same compiled peak memory:

- **the forward statistics** E[x] and E[x^2] of every BatchNorm (:func:`moment_sums`): one
  kernel that streams x once, 1.05-1.35x faster than XLA's reduce fusions at ResNet-50's
  shapes, which load one bf16 per instruction;
- **the backward reductions of a BatchNorm + ReLU** (:func:`relu_grad_sums`): sum(g) and
  sum(g * (x - mean)), g the ReLU-masked dy, in one kernel that reads x and dy and recomputes
  the mask in registers. XLA writes the masked dy and reads it back (7 passes over the
  activation, 5 here). A BatchNorm before a residual add keeps XLA's backward: its masked
  dy is the shortcut's gradient too, so it is written anyway;
- **the classic stem's BatchNorm + max pool + ReLU** (:func:`bn_pool_relu_train`, a candidate
  off by default: ``layers.FUSE_STEM_POOL``): two backward kernels that build the pool's
  gradient in registers from the pooled cotangent, so it is never stored.

The function and its derivatives are the textbook BatchNorm's (tests compare values and
gradients with torch's ``batch_norm`` + ``relu``, and forward mode with plain autodiff).
The BatchNorm + ReLU is a ``custom_jvp`` whose tangent map is a ``linear_call``: first-order
forward and reverse mode work, second-order derivatives through it do not. The ReLU mask is
recomputed in the kernel, in the dx pass and in the forward pass separately: where a
pre-activation is within a rounding error of 0 they may disagree, which changes that
element's gradient by at most its dy.

Sharding: XLA cannot split a kernel's custom call and would gather a batch-sharded input on
every device, so each sum is a ``custom_partitioning`` op (:func:`_row_sharded`): every
device sums its own rows, and one all-reduce adds the (2, C) results, the all-reduce that
synchronised BatchNorm needs anyway. ``interpret=True`` runs the same kernel bodies under
the Pallas interpreter on any backend (the CPU tests).

jax 0.11 deprecates Pallas's Triton backend in favour of Mosaic GPU; these kernels use
Triton, which compiles for every NVIDIA GPU jax supports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array
Dtype = Any

# Rows (N*H*W positions) and channels per kernel instance, rows per loop iteration inside it,
# warps per instance, and Triton's software-pipelining stages for the loop's loads. 512x32 with
# 4 warps was the fastest of six block shapes for both kernels on the H100
# (docs/performance.md). The kernels read these when they are traced (a benchmark may patch them).
BLOCK_ROWS, SUB_ROWS, BLOCK_CHANNELS, NUM_WARPS, NUM_STAGES = 512, 32, 128, 4, 2
# Where a kernel would run fewer instances than this, its row blocks are halved (down to
# MIN_BLOCK_ROWS) until it runs at least this many: small activations (7x7 or 14x14 at batch
# 256) otherwise run ~200 instances on an H100's 132 SMs and reach about half its bandwidth.
# 0 turns it off (the default until a device times it: docs/performance.md).
MIN_PROGRAMS, MIN_BLOCK_ROWS = 0, 32


# ---------------------------------------------------------------- the reduction kernels
def _sums_kernel(x_ref, dy_ref, mean_ref, a_ref, b_ref, out_ref, *, rows: int, sub: int) -> None:
    """One (rows, channels) block: out[0] = sum of g, out[1] = sum of g * (x - mean), where
    g = dy where (x - mean) * a + b > 0 else 0, accumulated in float32 ``sub`` rows at a time."""
    mean, a, b = mean_ref[...], a_ref[...], b_ref[...]

    def body(i: int, acc: tuple[Array, Array]) -> tuple[Array, Array]:
        sum_g, sum_gc = acc
        g, centred = relu_grad(x_ref[pl.ds(i * sub, sub), :], dy_ref[pl.ds(i * sub, sub), :], mean, a, b)
        return sum_g + g, sum_gc + g * centred

    _accumulate(body, x_ref, out_ref, rows, sub)


def _moments_kernel(x_ref, out_ref, *, rows: int, sub: int) -> None:
    """One (rows, channels) block: out[0] = sum of x, out[1] = sum of x * x, in float32."""

    def body(i: int, acc: tuple[Array, Array]) -> tuple[Array, Array]:
        sum_x, sum_xx = acc
        x = x_ref[pl.ds(i * sub, sub), :].astype(jnp.float32)
        return sum_x + x, sum_xx + x * x

    _accumulate(body, x_ref, out_ref, rows, sub)


def _accumulate(body: Callable, x_ref, out_ref, rows: int, sub: int) -> None:
    """Runs ``body`` over the block's ``rows // sub`` slices of ``sub`` rows with two float32
    (sub, channels) accumulators, and writes their column sums to ``out_ref[0]`` and ``[1]``."""
    zeros = jnp.zeros((sub, x_ref.shape[1]), jnp.float32)
    first, second = jax.lax.fori_loop(0, rows // sub, body, (zeros, zeros))
    out_ref[0, :] = jnp.sum(first, axis=0)
    out_ref[1, :] = jnp.sum(second, axis=0)


def _largest_power_of_two_divisor(n: int, cap: int) -> int:
    size = cap
    while size > 1 and n % size:
        size //= 2
    return size


def _block_sums(
    kernel: Callable, name: str, matrices: Sequence[Array], vectors: Sequence[Array], *,
    block_rows: int | None, sub_rows: int | None, block_channels: int | None, num_warps: int | None,
    num_stages: int | None, interpret: bool,
) -> Array | None:
    """Runs ``kernel`` over (block_rows, block_channels) blocks of the (M, C) ``matrices`` with
    the float32 (C,) ``vectors`` beside them, and adds its per-block (2, C) partial sums.
    Returns the float32 (2, C) sums, or None where the largest power-of-two blocks that divide
    M and C leave fewer than 8 rows or channels (the caller then uses plain XLA). A block
    parameter given as None takes the module's default (``BLOCK_ROWS`` etc.) at trace time;
    ``MIN_PROGRAMS`` may shrink the row blocks further."""
    block_rows, sub_rows = block_rows or BLOCK_ROWS, sub_rows or SUB_ROWS
    block_channels, num_warps = block_channels or BLOCK_CHANNELS, num_warps or NUM_WARPS
    num_stages = num_stages or NUM_STAGES
    m, c = matrices[0].shape
    rows = _largest_power_of_two_divisor(m, block_rows)
    channels = _largest_power_of_two_divisor(c, block_channels)
    while rows // 2 >= max(MIN_BLOCK_ROWS, 8) and (m // rows) * (c // channels) < MIN_PROGRAMS:
        rows //= 2  # still a power of two that divides m
    if rows < 8 or channels < 8:
        return None
    grid = (m // rows, c // channels)
    vector = pl.BlockSpec((1, channels), lambda i, j: (0, j))
    partial = pl.pallas_call(
        functools.partial(kernel, rows=rows, sub=min(sub_rows, rows)),
        grid=grid,
        in_specs=[pl.BlockSpec((rows, channels), lambda i, j: (i, j))] * len(matrices) + [vector] * len(vectors),
        out_specs=pl.BlockSpec((None, 2, channels), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((grid[0], 2, c), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=name,
    )(*matrices, *(v.reshape(1, c) for v in vectors))
    return jnp.sum(partial, axis=0)


def relu_grad_sums(
    x: Array, dy: Array, mean: Array, a: Array, b: Array, *,
    block_rows: int | None = None, sub_rows: int | None = None, block_channels: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False,
) -> tuple[Array, Array]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` over the rows of ``x`` and ``dy``
    (M, C), where ``g = dy`` where ``(x - mean) * a + b > 0``, else 0; ``mean``, ``a``, ``b``
    are float32 (C,). Returns two float32 (C,) arrays.

    One Pallas (Triton) kernel reads ``x`` and ``dy`` once and writes one partial sum per
    block of ``block_rows`` rows; XLA adds the partial sums. A block parameter left None is
    the module's (``BLOCK_ROWS``, ``SUB_ROWS``, ``BLOCK_CHANNELS``, ``NUM_WARPS``,
    ``NUM_STAGES``) when traced. Block sizes shrink to the largest powers of two that divide
    M and C; where that leaves fewer than 8 rows or channels, plain XLA reductions are used
    instead. A GPU only, unless ``interpret``.
    """
    sums = _block_sums(_sums_kernel, "batch_norm_relu_grad_sums", (x, dy), (mean, a, b), block_rows=block_rows,
                       sub_rows=sub_rows, block_channels=block_channels, num_warps=num_warps, num_stages=num_stages,
                       interpret=interpret)
    if sums is None:
        g, centred = relu_grad(x, dy, mean, a, b)
        return jnp.sum(g, axis=0), jnp.sum(g * centred, axis=0)
    return sums[0], sums[1]


def moment_sums(
    x: Array, *, block_rows: int | None = None, sub_rows: int | None = None, block_channels: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False,
) -> tuple[Array, Array]:
    """Per-channel ``sum(x)`` and ``sum(x * x)`` in float32 over the rows of ``x`` (M, C), in
    one Pallas (Triton) kernel that reads ``x`` once. Block sizes and the fallback to XLA as
    :func:`relu_grad_sums`. A GPU only, unless ``interpret``."""
    sums = _block_sums(_moments_kernel, "batch_norm_moment_sums", (x,), (), block_rows=block_rows,
                       sub_rows=sub_rows, block_channels=block_channels, num_warps=num_warps, num_stages=num_stages,
                       interpret=interpret)
    if sums is None:
        xf = x.astype(jnp.float32)
        return jnp.sum(xf, axis=0), jnp.sum(xf * xf, axis=0)
    return sums[0], sums[1]


def row_sharded_op(fn: Callable, rows_in: Sequence[bool], rows_out: Sequence[bool], sharding_rule: str,
                   reduction_factors: Sequence[str] = ()) -> Callable:
    """``fn`` (a kernel call) as a ``custom_partitioning`` op for a batch split by rows. XLA's
    partitioner cannot split a kernel's custom call and would replicate batch-sharded inputs on
    every device; here each device runs ``fn`` on its own rows. The arguments marked in
    ``rows_in`` are split by their first dimension (the rows), the others replicated; the
    results marked in ``rows_out`` stay split by rows, the others are sums over the rows,
    added across the devices that share them (``psum``: for the BatchNorm kernels, the
    all-reduce that whole-batch BatchNorm needs anyway). ``fn`` returns one array or a tuple
    (one entry of ``rows_out`` each). ``sharding_rule`` (Shardy's einsum-like rule, rows
    named ``m``) and ``reduction_factors`` describe the same to Shardy."""
    single = len(rows_out) == 1

    def rows_of(arg_shapes) -> tuple[Any, tuple[str, ...]]:
        spec = arg_shapes[0].sharding.spec
        rows = spec[0] if len(spec) else None
        return rows, () if rows is None else tuple(rows) if isinstance(rows, tuple) else (rows,)

    def result_shardings(mesh, rows) -> Any:
        out = tuple(NamedSharding(mesh, P(rows) if by_rows else P()) for by_rows in rows_out)
        return out[0] if single else out

    op = custom_partitioning(fn)

    def partition(mesh, arg_shapes, result_shape):
        rows, axes = rows_of(arg_shapes)

        def lower(*args: Array) -> Any:
            out = fn(*args)
            outs = (out,) if single else out
            outs = tuple(o if by_rows or not axes else jax.lax.psum(o, axes) for o, by_rows in zip(outs, rows_out))
            return outs[0] if single else outs

        args = tuple(NamedSharding(mesh, P(rows) if by_rows else P()) for by_rows in rows_in)
        return mesh, lower, result_shardings(mesh, rows), args

    op.def_partition(partition=partition,
                     infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape:
                     result_shardings(mesh, rows_of(arg_shapes)[0]),
                     sharding_rule=sharding_rule, reduction_factors=tuple(reduction_factors))
    return op


def _row_sharded(sums: Callable, row_args: int, vector_args: int) -> Callable:
    """``sums`` (row sums of (M, C) arrays, returning two (C,) arrays) as a
    :func:`row_sharded_op` returning them stacked, (2, C): the first ``row_args`` arguments are
    (M, C) and split by rows, the ``vector_args`` after them (C,) vectors."""

    def local(*args: Array) -> Array:
        return jnp.stack(sums(*args))

    operands = ", ".join(["m c"] * row_args + ["c"] * vector_args)
    return row_sharded_op(local, (True,) * row_args + (False,) * vector_args, (False,), f"{operands} -> t c", ("m",))


# The sharded ops, compiled (False) or under the interpreter (True).
_GRAD_SUMS = {interpret: _row_sharded(functools.partial(relu_grad_sums, interpret=interpret), 2, 3)
              for interpret in (False, True)}
_MOMENTS = {interpret: _row_sharded(functools.partial(moment_sums, interpret=interpret), 1, 0)
            for interpret in (False, True)}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def batch_moments(xf: Array, storage_dtype: Dtype, interpret: bool = False) -> tuple[Array, Array]:
    """``mean(x)`` and ``mean(x * x)`` over the rows of ``xf`` (M, C), float32 (C,), through
    :func:`moment_sums`. ``xf`` is the float32 view of an activation stored in
    ``storage_dtype``: the kernel reads ``xf.astype(storage_dtype)``, which XLA folds back to
    the stored array (a widening convert and its inverse), and the derivatives meet the
    BatchNorm's other uses of ``xf`` in float32, so dx is summed once in float32 and
    converted once. The tangent is written out as plain reductions, ``mean(t)`` and
    ``mean(2 x t)``: what autodiff of ``jnp.mean`` gives."""
    sums = _MOMENTS[interpret](xf.astype(storage_dtype))
    return sums[0] / xf.shape[0], sums[1] / xf.shape[0]


@batch_moments.defjvp
def _batch_moments_jvp(storage_dtype: Dtype, interpret: bool, primals: tuple, tangents: tuple) -> tuple:
    (xf,), (tf,) = primals, tangents
    return batch_moments(xf, storage_dtype, interpret), (jnp.mean(tf, axis=0), jnp.mean(2 * xf * tf, axis=0))


# ---------------------------------------------------------------- BatchNorm + ReLU
@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def bn_relu_apply(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
                  interpret: bool = False) -> Array:
    """``relu((x - mean) * rsqrt(var + epsilon) * scale + bias)`` in ``dtype``; x is (..., C),
    the others float32 (C,). Reverse mode sums dscale and dbias (and the cotangents of mean
    and var) with :func:`relu_grad_sums`, reading x and dy only."""
    a = jax.lax.rsqrt(var + epsilon) * scale
    return relu_bn(x, mean, a, bias).astype(dtype)


def relu_bn(x: Array, mean: Array, a: Array, b: Array) -> Array:
    """``relu((x - mean) * a + b)`` in float32, with ``a = scale * rsqrt(var + eps)`` and
    ``b = bias``: the BatchNorm + ReLU that :func:`bn_relu_apply` returns and the fused
    convolution's kernels (``pallas_fused_conv``) apply to their input."""
    return jnp.maximum((x.astype(jnp.float32) - mean) * a + b, 0.0)


def relu_grad(x: Array, dy: Array, mean: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """``(g, x - mean)`` in float32, g = dy where :func:`relu_bn`'s ReLU passes
    (``(x - mean) * a + b > 0``), else 0: the terms :func:`relu_grad_sums` adds up, for the
    kernels and XLA code that sum them."""
    centred = x.astype(jnp.float32) - mean
    return jnp.where(centred * a + b > 0, dy.astype(jnp.float32), 0.0), centred


def _bn_relu_tangent(epsilon: float, dtype: Dtype, present: tuple[bool, ...], res: tuple, lin: tuple) -> Array:
    """The tangent of :func:`bn_relu_apply` at ``res = (x, mean, var, scale, bias)``: ``lin``
    holds the tangents of those inputs marked ``present`` (the others are symbolic zeros)."""
    x, mean, var, scale, bias = res
    inv = jax.lax.rsqrt(var + epsilon)
    centred, a = x.astype(jnp.float32) - mean, inv * scale
    it = iter(lin)
    tx, tmean, tvar, tscale, tbias = (next(it) if p else None for p in present)
    tz = jnp.zeros_like(centred)
    if tx is not None:
        tz = tz + tx.astype(jnp.float32) * a
    if tmean is not None:
        tz = tz - tmean * a
    if tvar is not None:
        tz = tz + centred * (-0.5 * scale * inv**3 * tvar)
    if tscale is not None:
        tz = tz + centred * (inv * tscale)
    if tbias is not None:
        tz = tz + tbias
    return jnp.where(centred * a + bias > 0, tz, 0.0).astype(dtype)


def _bn_relu_transpose(epsilon: float, interpret: bool, present: tuple[bool, ...], res: tuple, ct: Array,
                       sums: Array | None = None) -> tuple:
    """The transpose of :func:`_bn_relu_tangent`: the cotangents of the ``present`` inputs
    for the output cotangent ``ct``. dscale and dbias are summed by :func:`relu_grad_sums`
    (x and ct read once) unless ``sums`` gives them (its float32 (2, C) result, summed by
    whoever made ct), dx is one XLA loop fusion reading x and ct."""
    x, mean, var, scale, bias = res
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv * scale
    c = x.shape[-1]
    if sums is None:
        sums = _GRAD_SUMS[interpret](x.reshape(-1, c), ct.reshape(-1, c), mean, a, bias)
    sum_g, sum_gc = sums[0], sums[1]
    # The barrier keeps XLA from merging this mask with the forward pass's (it would then
    # store the mask); dx is one loop fusion reading x and ct.
    mean_b, a_b, bias_b = jax.lax.optimization_barrier((mean, a, bias))
    centred = x.astype(jnp.float32) - mean_b
    ct_x = jnp.where(centred * a_b + bias_b > 0, ct.astype(jnp.float32) * a_b, 0.0).astype(x.dtype)
    cts = (ct_x, -sum_g * a, sum_gc * (-0.5 * scale * inv**3), sum_gc * inv, sum_g)
    return tuple(ct_i for ct_i, p in zip(cts, present) if p)


def present_tangents(tangents: tuple) -> tuple[tuple[bool, ...], tuple]:
    """Which of a ``custom_jvp``'s tangents (``symbolic_zeros=True``) are not symbolic zeros, and
    those tangents: only they may be ``linear_call``'s linear arguments (a zero one would be a
    constant, which ``linear_call`` cannot transpose)."""
    present = tuple(not isinstance(t, jax.custom_derivatives.SymbolicZero) for t in tangents)
    return present, tuple(t for t, p in zip(tangents, present) if p)


def _bn_relu_apply_jvp(epsilon: float, dtype: Dtype, interpret: bool, primals: tuple,
                       tangents: tuple) -> tuple[Array, Array]:
    y = bn_relu_apply(*primals, epsilon, dtype, interpret)
    present, linear = present_tangents(tangents)
    return y, jax.custom_derivatives.linear_call(
        functools.partial(_bn_relu_tangent, epsilon, dtype, present),
        functools.partial(_bn_relu_transpose, epsilon, interpret, present), primals, linear)


bn_relu_apply.defjvp(_bn_relu_apply_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------- BatchNorm + max pool + ReLU
# The classic stem's tail (layers.FUSE_STEM_POOL): y = BatchNorm(x), then the 3x3/2 max pool
# (padding 1) and ReLU. The forward pass is XLA's (layers.pool_with_first_max), which also keeps,
# per pooled output, the int8 index of the window tap its gradient goes to, or 9 where the ReLU
# zeroes it ("code"). The reverse pass is two kernels that read x, the output's cotangent and the
# code and build the pool's input gradient in registers, one pooled row (two rows of x) at a
# time: one sums the BatchNorm's backward reductions, one writes dx. XLA instead writes that
# gradient (a full-resolution bf16 tensor) and reads it twice (docs/performance.md, change 22).

# Pooled rows per kernel instance (a power of two dividing N * H / 2), channels per instance,
# warps. Not timed on a device yet.
POOL_ROWS, POOL_CHANNELS, POOL_WARPS = 4, 32, 4
_NO_TAP = 9


def stem_pool_fusable(shape: Sequence[int]) -> bool:
    """Whether :func:`bn_pool_relu_train` takes an (N, H, W, C) input: H and W even (the pool's
    2x2 parity planes are then whole) and at least 4 (a pooled row fills a tile of 2 or more),
    and C a multiple of 16 (the kernels' channel blocks)."""
    return len(shape) == 4 and shape[1] % 2 == 0 and shape[2] % 2 == 0 and shape[1] >= 4 and shape[2] >= 4 \
        and shape[3] % 16 == 0


def _pool_grad_tiles(ct_ref, code_ref, q: Array, ho: int, wo: int, wp: int, cols: Any) -> tuple[Array, ...]:
    """The pool's input gradient for pooled row ``q`` (image q // ho, row q % ho), float32, as
    four (wp, channels) tiles: x's pixels (2o + r, 2p + s) for (r, s) = (0, 0), (0, 1), (1, 0),
    (1, 1), p = 0 .. wp - 1 (those >= wo are 0). Pixel parity 0 in a dimension is tap 1 of
    window p; parity 1 is tap 2 of window p and tap 0 of window p + 1. Terms are added in
    window order (row-major), as XLA's select-and-scatter adds them."""
    p = jax.lax.broadcasted_iota(jnp.int32, (wp, cols.size), 0)
    own, right = p < wo, p + 1 < wo
    below = (q % ho) + 1 < ho
    base = q * wo

    def load(offset: int | Array, mask: Array) -> tuple[Array, Array]:
        rows = pl.ds(base + offset, wp)
        g = plgpu.load(ct_ref.at[rows, cols], mask=mask, other=0).astype(jnp.float32)
        k = plgpu.load(code_ref.at[rows, cols], mask=mask, other=_NO_TAP)
        return g, k

    (g00, k00), (g01, k01) = load(0, own), load(1, right)
    (g10, k10), (g11, k11) = load(wo, own & below), load(wo + 1, right & below)

    def tap(k: Array, g: Array, index: int) -> Array:
        return jnp.where(k == index, g, 0.0)

    return (tap(k00, g00, 4),
            tap(k00, g00, 5) + tap(k01, g01, 3),
            tap(k00, g00, 7) + tap(k10, g10, 1),
            tap(k00, g00, 8) + tap(k01, g01, 6) + tap(k10, g10, 2) + tap(k11, g11, 0))


def _x_rows(q: Array, r: int, wo: int, wp: int) -> Any:
    return pl.ds((q * 2 + r) * wo, wp)


def _pool_grad_sums_kernel(x_ref, ct_ref, code_ref, mean_ref, out_ref, *, rows: int, ho: int, wo: int, wp: int,
                           channels: int, block: int) -> None:
    """out[0] = sum of the pool's input gradient g, out[1] = sum of g * (x - mean), over ``rows``
    pooled rows and one block of channels."""
    i, j = pl.program_id(0), pl.program_id(1)
    mean = mean_ref[...]
    valid = jax.lax.broadcasted_iota(jnp.int32, (wp, block), 0) < wo

    def body(k: int, acc: tuple[Array, Array]) -> tuple[Array, Array]:
        q = i * rows + k
        grads = _pool_grad_tiles(ct_ref, code_ref, q, ho, wo, wp, pl.ds(j * block, block))
        sum_g, sum_gc = acc
        for n, g in enumerate(grads):
            r, s = divmod(n, 2)
            x = plgpu.load(x_ref.at[_x_rows(q, r, wo, wp), pl.ds(s * channels + j * block, block)], mask=valid, other=0)
            sum_g, sum_gc = sum_g + g, sum_gc + g * (x.astype(jnp.float32) - mean)
        return sum_g, sum_gc

    zeros = jnp.zeros((wp, block), jnp.float32)
    sum_g, sum_gc = jax.lax.fori_loop(0, rows, body, (zeros, zeros))
    out_ref[0, :] = jnp.sum(sum_g, axis=0)
    out_ref[1, :] = jnp.sum(sum_gc, axis=0)


def _pool_grad_x_kernel(x_ref, ct_ref, code_ref, mean_ref, a_ref, k1_ref, k0_ref, dx_ref, *, rows: int, ho: int,
                        wo: int, wp: int, channels: int, block: int) -> None:
    """dx = a * g + k1 * (x - mean) + k0 over ``rows`` pooled rows and one block of channels,
    g the pool's input gradient: the BatchNorm's input gradient, in x's dtype."""
    i, j = pl.program_id(0), pl.program_id(1)
    mean, a, k1, k0 = mean_ref[...], a_ref[...], k1_ref[...], k0_ref[...]
    valid = jax.lax.broadcasted_iota(jnp.int32, (wp, block), 0) < wo

    def body(k: int, carry: int) -> int:
        q = i * rows + k
        grads = _pool_grad_tiles(ct_ref, code_ref, q, ho, wo, wp, pl.ds(j * block, block))
        for n, g in enumerate(grads):
            r, s = divmod(n, 2)
            at = (_x_rows(q, r, wo, wp), pl.ds(s * channels + j * block, block))
            x = plgpu.load(x_ref.at[at], mask=valid, other=0).astype(jnp.float32)
            plgpu.store(dx_ref.at[at], (a * g + k1 * (x - mean) + k0).astype(dx_ref.dtype), mask=valid)
        return carry

    jax.lax.fori_loop(0, rows, body, 0)


def _pool_grad_call(kernel: Callable, name: str, x: Array, ct: Array, code: Array, vectors: Sequence[Array],
                    sums: bool, interpret: bool) -> Array:
    """Runs a pool-gradient kernel over (N, H, W, C) ``x``, its pooled (N, H/2, W/2, C) ``ct`` and
    ``code``, with float32 (C,) ``vectors``: the (2, C) sums, or dx like x."""
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    wp = 1 << (wo - 1).bit_length()
    rows = _largest_power_of_two_divisor(n * ho, POOL_ROWS)
    block = _largest_power_of_two_divisor(c, POOL_CHANNELS)
    grid = (n * ho // rows, c // block)
    whole = [pl.BlockSpec()] * 3  # whole arrays: the kernels address their rows themselves
    vector = pl.BlockSpec((1, block), lambda i, j: (0, j))
    if sums:
        out_specs = pl.BlockSpec((None, 2, block), lambda i, j: (i, 0, j))
        out_shape = jax.ShapeDtypeStruct((grid[0], 2, c), jnp.float32)
    else:
        out_specs = pl.BlockSpec()
        out_shape = jax.ShapeDtypeStruct((n * ho * 2 * wo, 2 * c), x.dtype)
    out = pl.pallas_call(
        functools.partial(kernel, rows=rows, ho=ho, wo=wo, wp=wp, channels=c, block=block),
        grid=grid,
        in_specs=whole + [vector] * len(vectors),
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=POOL_WARPS, num_stages=1),
        name=name,
    )(x.reshape(n * ho * 2 * wo, 2 * c), ct.reshape(n * ho * wo, c), code.reshape(n * ho * wo, c),
      *(v.reshape(1, c) for v in vectors))
    return jnp.sum(out, axis=0) if sums else out.reshape(x.shape)


def _pool_grad_ops(interpret: bool) -> tuple[Callable, Callable]:
    """The two kernels as :func:`row_sharded_op`s: each device runs them on its own images."""
    def grad_sums(x: Array, ct: Array, code: Array, mean: Array) -> Array:
        return _pool_grad_call(_pool_grad_sums_kernel, "batch_norm_pool_relu_grad_sums", x, ct, code, (mean,),
                               True, interpret)

    def grad_x(x: Array, ct: Array, code: Array, mean: Array, a: Array, k1: Array, k0: Array) -> Array:
        return _pool_grad_call(_pool_grad_x_kernel, "batch_norm_pool_relu_grad_x", x, ct, code, (mean, a, k1, k0),
                               False, interpret)

    images = "m h w c, m i j c, m i j c"
    return (row_sharded_op(grad_sums, (True, True, True, False), (False,), f"{images}, c -> t c", ("m",)),
            row_sharded_op(grad_x, (True, True, True) + (False,) * 4, (True,), f"{images}, c, c, c, c -> m h w c"))


_POOL_GRAD = {interpret: _pool_grad_ops(interpret) for interpret in (False, True)}


def _bn_pool_relu_forward(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
                          interpret: bool) -> tuple[Array, Array, Array, Array]:
    from resnet_jax.models.layers import pool_with_first_max

    c = x.shape[-1]
    sums = _MOMENTS[interpret](x.reshape(-1, c))
    mean, mean_sq = sums[0] / (x.size // c), sums[1] / (x.size // c)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    y = ((x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
    pooled, first_max = pool_with_first_max(y)
    code = jnp.where(pooled > 0, first_max, jnp.int8(_NO_TAP))
    return jnp.maximum(pooled, jnp.zeros((), pooled.dtype)), mean, var, code


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def bn_pool_relu_train(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
                       interpret: bool = False) -> tuple[Array, Array, Array]:
    """``relu(max_pool_3x3_s2(BatchNorm(x)))`` in training mode with whole-batch statistics: x
    is (N, H, W, C) with H, W even and C a multiple of 16 (:func:`stem_pool_fusable`), ``scale``
    and ``bias`` float32 (C,). Returns the (N, H/2, W/2, C) output in ``dtype`` and the float32
    (C,) mean and biased variance of x.

    The values are those of the layers one after another (the BatchNorm's output rounded to
    ``dtype`` before the pool). The derivative goes, as ``nn.max_pool``'s, to the first maximum
    of each window, and is 0 where the output is 0. Reverse mode reads x, the output's
    cotangent and one int8 per output (which tap, if any, gets it), in two kernels (the
    BatchNorm's sums, then dx), and adds the pool's gradient in float32. Forward mode works;
    second-order derivatives through it do not (``linear_call``). The statistics' derivative
    assumes a positive variance. A GPU only, unless ``interpret``."""
    out, mean, var, _ = _bn_pool_relu_forward(x, scale, bias, epsilon, dtype, interpret)
    return out, mean, var


def _bn_pool_relu_tangent(epsilon: float, dtype: Dtype, present: tuple[bool, ...], res: tuple,
                          lin: tuple) -> tuple[Array, Array, Array]:
    from resnet_jax.models.layers import pool_tangent

    x, mean, var, scale, code = res
    inv = jax.lax.rsqrt(var + epsilon)
    centred, a = x.astype(jnp.float32) - mean, inv * scale
    axes = tuple(range(x.ndim - 1))
    it = iter(lin)
    tx, tscale, tbias = (next(it) if p else None for p in present)
    ty = jnp.zeros_like(centred)
    tmean = tvar = jnp.zeros_like(mean)
    if tx is not None:
        txf = tx.astype(jnp.float32)
        tmean, tvar = jnp.mean(txf, axis=axes), jnp.mean(2 * centred * txf, axis=axes)
        ty = ty + (txf - tmean) * a + centred * (-0.5 * scale * inv**3 * tvar)
    if tscale is not None:
        ty = ty + centred * (inv * tscale)
    if tbias is not None:
        ty = ty + tbias
    return pool_tangent(code, ty.astype(dtype)), tmean, tvar


def _bn_pool_relu_transpose(epsilon: float, interpret: bool, present: tuple[bool, ...], res: tuple,
                            cts: tuple[Array, Array, Array]) -> tuple:
    x, mean, var, scale, code = res
    ct, ct_mean, ct_var = cts
    grad_sums, grad_x = _POOL_GRAD[interpret]
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv * scale
    m = x.size // x.shape[-1]
    sums = grad_sums(x, ct, code, mean)
    sum_g, sum_gc = sums[0], sums[1]
    # y's derivative in mean and var, plus the cotangents of the returned statistics; x reaches
    # them through mean = E[x] and var = E[x^2] - mean^2, so dx = a g + k1 (x - mean) + k0
    d_mean = -sum_g * a + ct_mean
    d_var = sum_gc * (-0.5 * scale * inv**3) + ct_var
    cts_in = []
    if present[0]:
        cts_in.append(grad_x(x, ct, code, mean, a, 2 * d_var / m, d_mean / m))
    if present[1]:
        cts_in.append(sum_gc * inv)
    if present[2]:
        cts_in.append(sum_g)
    return tuple(cts_in)


def _bn_pool_relu_jvp(epsilon: float, dtype: Dtype, interpret: bool, primals: tuple, tangents: tuple) -> tuple:
    x, scale, bias = primals
    out, mean, var, code = _bn_pool_relu_forward(x, scale, bias, epsilon, dtype, interpret)
    present, linear = present_tangents(tangents)
    res = (x, mean, var, scale.astype(jnp.float32), code)  # the bias's derivative needs no residual
    tangent = jax.custom_derivatives.linear_call(
        functools.partial(_bn_pool_relu_tangent, epsilon, dtype, present),
        functools.partial(_bn_pool_relu_transpose, epsilon, interpret, present), res, linear)
    return (out, mean, var), tangent


bn_pool_relu_train.defjvp(_bn_pool_relu_jvp, symbolic_zeros=True)


def batch_norm_train(
    x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
    activation: Callable[[Array], Array] | None = None, *,
    kernel_statistics: bool = True, interpret: bool = False,
) -> tuple[Array, Array, Array]:
    """``activation(BatchNorm(x))`` in training mode with whole-batch statistics: x is
    (N, ..., C), ``scale`` and ``bias`` (C,). Returns the output in ``dtype`` and the float32
    (1, C) mean and biased variance (``layers._batch_norm_train`` with one group).

    The statistics come from :func:`batch_moments` (``kernel_statistics=False``: XLA's
    ``jnp.mean``, for benchmarks). A ReLU activation (one of ``layers.RELUS``) goes through
    :func:`bn_relu_apply`; ``layers.max_pool_relu`` (the stem's pool and ReLU) through
    :func:`bn_pool_relu_train` where :func:`stem_pool_fusable` allows; another function, or
    None, gets the plain formula. The kernels are compiled for a GPU; ``interpret=True`` runs
    them under the Pallas interpreter instead."""
    from resnet_jax.models.layers import RELUS, max_pool_relu

    if activation is max_pool_relu and kernel_statistics and stem_pool_fusable(x.shape):
        y, mean, var = bn_pool_relu_train(x, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon, dtype,
                                          interpret)
        return y, mean[None], var[None]
    c, xf = x.shape[-1], x.astype(jnp.float32)
    if kernel_statistics:
        mean, mean_sq = batch_moments(xf.reshape(-1, c), x.dtype, interpret)
    else:
        axes = tuple(range(x.ndim - 1))
        mean, mean_sq = jnp.mean(xf, axis=axes), jnp.mean(jnp.square(xf), axis=axes)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if activation in RELUS:
        y = bn_relu_apply(x, mean, var, scale, bias, epsilon, dtype, interpret)
    else:
        y = ((xf - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
        y = y if activation is None else activation(y)
    return y, mean[None], var[None]
