"""Candidate: BatchNorm + ReLU whose backward reductions run in one hand-written (Pallas) kernel.

Compiled for the H100, the ResNet-50 step moves 7 units of each inner BatchNorm's input
(bn1, bn2 of every block; 1 unit = one read of the bf16 activation) in its backward pass:
one XLA reduce fusion reads x, y and dy and writes the masked dy, a second reads that and x
and writes dx. XLA will not recompute the ReLU mask from x inside its reduction
(docs/performance.md: ``custom_jvp``, ``jax.checkpoint`` and ``linear_call`` variants all
kept or wrote the mask). Here the reduction pass is a Pallas (Triton) kernel that reads x
and dy only and recomputes the mask in registers; the dx pass stays an XLA loop fusion that
reads x and dy and writes dx: 5 units. Compiled for the H100 the step then moves
84.14 GiB instead of 87.27 (-3.6%) in 961 kernels instead of 1,025, with the same peak
memory. The bn3 BatchNorms (ReLU after the residual add) stay as they are: their masked dy
is also the shortcut's gradient, so it has to be written anyway (7 units, no saving).

How it is built (:func:`bn_relu_apply`): the elementwise ``relu((x - mean) * rsqrt(var + eps)
* scale + bias)`` with ``mean`` and ``var`` taken as inputs, so the statistics stay plain
autodiff (as in ``layers._batch_norm_train``). It is a ``custom_jvp`` whose tangent map is a
``jax.custom_derivatives.linear_call``: forward mode evaluates the textbook tangent, reverse
mode runs the hand-written transpose. First-order forward mode (``jax.jvp``) keeps working,
unlike with ``custom_vjp``; second-order derivatives through it do not.

The kernel runs only where the step is lowered for an NVIDIA GPU
(``jax.lax.platform_dependent``); elsewhere the same sums are plain XLA reductions, or the
kernel under the Pallas interpreter (``interpret=True``) for the CPU tests. The ReLU mask is
recomputed in the kernel, in the dx fusion and in the forward pass separately: at an
element whose pre-activation is within a rounding error of 0 they may disagree (a fused
multiply-add in one of them), which changes that element's gradient by at most its dy.

XLA's partitioner cannot split the kernel's custom call (with the batch sharded over several
GPUs it would replicate x and dy), so the sums are a ``custom_partitioning`` op: each device
sums its own rows and one all-reduce adds them (:func:`_sharded`). Compiled for two H100s,
the ResNet-50 step at batch 512 moves 86.28 GiB per device against the model's 90.98, with
the same all-reduces.

A second candidate on top of it: every BatchNorm's forward statistics, E[x] and E[x^2], from
a Pallas kernel of the same kind (:func:`moment_sums`, :func:`batch_moments`). It moves the
same bytes as XLA's reduce fusions, which reach only 2.4 TB/s on the H200 (its elementwise
kernels 4.3); compiled for the H100 the step moves 84.2 GiB in 909 kernels.

Not in the model until a device timing shows the gain: :func:`patched` swaps them into
``layers._batch_norm_train`` for BatchNorms with whole-batch statistics (the model's own
path is kept for ghost BatchNorm). ``stem_variants.py`` times the whole ResNet-50 step with
them (``--bn-relu pallas``, ``pallas-stats``); this script times the BatchNorm + ReLU alone,
forward and backward, at ResNet-50's inner shapes, the statistics kernel against XLA's at
every BatchNorm shape, and both kernels alone at a few block sizes (``--blocks``; their
register use, compiled for the H100 without one, is in docs/performance.md):

    python3 benchmarks/bn_relu_pallas.py --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

Array = jax.Array

# Rows (N*H*W positions) and channels per kernel instance, rows per loop iteration inside it.
BLOCK_ROWS, SUB_ROWS, BLOCK_CHANNELS, NUM_WARPS = 512, 32, 128, 4


# ---------------------------------------------------------------- the reduction kernels
def _sums_kernel(x_ref, dy_ref, mean_ref, a_ref, b_ref, out_ref, *, rows: int, sub: int) -> None:
    """One (rows, channels) block: out[0] = sum of g, out[1] = sum of g * (x - mean), where
    g = dy where (x - mean) * a + b > 0 else 0, accumulated in float32 ``sub`` rows at a time."""
    mean, a, b = mean_ref[...], a_ref[...], b_ref[...]

    def body(i: int, acc: tuple[Array, Array]) -> tuple[Array, Array]:
        sum_g, sum_gc = acc
        x = x_ref[pl.ds(i * sub, sub), :].astype(jnp.float32)
        dy = dy_ref[pl.ds(i * sub, sub), :].astype(jnp.float32)
        centred = x - mean
        g = jnp.where(centred * a + b > 0, dy, 0.0)
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
    block_rows: int, sub_rows: int, block_channels: int, num_warps: int, interpret: bool,
) -> Array | None:
    """Runs ``kernel`` over (block_rows, block_channels) blocks of the (M, C) ``matrices`` with
    the float32 (C,) ``vectors`` beside them, and adds its per-block (2, C) partial sums.
    Returns the float32 (2, C) sums, or None where the largest power-of-two blocks that divide
    M and C leave fewer than 8 rows or channels (the caller then uses plain XLA)."""
    m, c = matrices[0].shape
    rows = _largest_power_of_two_divisor(m, block_rows)
    channels = _largest_power_of_two_divisor(c, block_channels)
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
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name=name,
    )(*matrices, *(v.reshape(1, c) for v in vectors))
    return jnp.sum(partial, axis=0)


def relu_grad_sums(
    x: Array, dy: Array, mean: Array, a: Array, b: Array, *,
    block_rows: int = BLOCK_ROWS, sub_rows: int = SUB_ROWS, block_channels: int = BLOCK_CHANNELS,
    num_warps: int = NUM_WARPS, interpret: bool = False,
) -> tuple[Array, Array]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` over the rows of ``x`` and ``dy``
    (M, C), where ``g = dy`` where ``(x - mean) * a + b > 0``, else 0; ``mean``, ``a``, ``b``
    are float32 (C,). Returns two float32 (C,) arrays.

    One Pallas (Triton) kernel reads ``x`` and ``dy`` once and writes one partial sum per
    block of ``block_rows`` rows; XLA adds the partial sums. Block sizes shrink to the
    largest powers of two that divide M and C; where that leaves fewer than 8 rows the plain
    XLA reductions are used instead.
    """
    sums = _block_sums(_sums_kernel, "batch_norm_relu_grad_sums", (x, dy), (mean, a, b), block_rows=block_rows,
                       sub_rows=sub_rows, block_channels=block_channels, num_warps=num_warps, interpret=interpret)
    return relu_grad_sums_xla(x, dy, mean, a, b) if sums is None else (sums[0], sums[1])


def relu_grad_sums_xla(x: Array, dy: Array, mean: Array, a: Array, b: Array, **_: object) -> tuple[Array, Array]:
    """:func:`relu_grad_sums` as plain XLA reductions (the CPU and TPU path)."""
    centred = x.astype(jnp.float32) - mean
    g = jnp.where(centred * a + b > 0, dy.astype(jnp.float32), 0.0)
    return jnp.sum(g, axis=0), jnp.sum(g * centred, axis=0)


def moment_sums(
    x: Array, *, block_rows: int = BLOCK_ROWS, sub_rows: int = SUB_ROWS, block_channels: int = BLOCK_CHANNELS,
    num_warps: int = NUM_WARPS, interpret: bool = False,
) -> tuple[Array, Array]:
    """Per-channel ``sum(x)`` and ``sum(x * x)`` in float32 over the rows of ``x`` (M, C): the
    forward statistics of every BatchNorm, in one Pallas (Triton) kernel that reads ``x``
    once. XLA's reduce fusions for these reach 2.4 TB/s on the H200 (the profile in
    docs/performance.md), where its elementwise kernels reach 4.3. Block sizes and the
    fallback as :func:`relu_grad_sums`."""
    sums = _block_sums(_moments_kernel, "batch_norm_moment_sums", (x,), (), block_rows=block_rows,
                       sub_rows=sub_rows, block_channels=block_channels, num_warps=num_warps, interpret=interpret)
    return moment_sums_xla(x) if sums is None else (sums[0], sums[1])


def moment_sums_xla(x: Array, **_: object) -> tuple[Array, Array]:
    """:func:`moment_sums` as plain XLA reductions (the model's own)."""
    xf = x.astype(jnp.float32)
    return jnp.sum(xf, axis=0), jnp.sum(xf * xf, axis=0)


# Where the step is not lowered for a GPU: "xla" (the plain reductions) or "interpret" (the
# kernel under the Pallas interpreter, for the CPU tests); :func:`patched` sets it.
_off_gpu = "xla"


def _sharded(on_gpu: Callable, off_gpu: Callable, row_args: int, vector_args: int) -> Callable:
    """Sums over rows as a ``custom_partitioning`` op: XLA's partitioner cannot split a
    kernel's custom call and would replicate batch-sharded inputs on every device. Here each
    device sums its own rows and the (2, C) results are added across the devices that share
    the rows (``psum``): the all-reduce that whole-batch BatchNorm needs anyway. The first
    ``row_args`` arguments are (M, C) and split by rows, the ``vector_args`` after them (C,)
    vectors. Returns the stacked (2, C) sums of ``on_gpu`` where lowered for an NVIDIA GPU,
    else of ``off_gpu``."""

    def local(*args: Array) -> Array:
        return jnp.stack(jax.lax.platform_dependent(*args, cuda=on_gpu, default=off_gpu))

    sums = custom_partitioning(local)

    def partition(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        rows = spec[0] if len(spec) else None
        axes = () if rows is None else tuple(rows) if isinstance(rows, tuple) else (rows,)
        by_rows, replicated = NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P())

        def lower(*args: Array) -> Array:
            partial = local(*args)
            return jax.lax.psum(partial, axes) if axes else partial

        return mesh, lower, replicated, (by_rows,) * row_args + (replicated,) * vector_args

    operands = ", ".join(["m c"] * row_args + ["c"] * vector_args)
    sums.def_partition(partition=partition,
                       infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: NamedSharding(mesh, P()),
                       sharding_rule=f"{operands} -> t c", reduction_factors=("m",))
    return sums


def _by_off_gpu(kernel: Callable, xla: Callable, row_args: int, vector_args: int) -> dict[str, Callable]:
    """The sharded op of ``kernel`` for each choice of ``_off_gpu``: ``xla`` (off a GPU, the
    plain reductions) and ``interpret`` (off a GPU, the kernel under the interpreter)."""
    return {name: _sharded(kernel, off_gpu, row_args, vector_args)
            for name, off_gpu in (("xla", xla), ("interpret", functools.partial(kernel, interpret=True)))}


GRAD_SUMS = _by_off_gpu(relu_grad_sums, relu_grad_sums_xla, row_args=2, vector_args=3)
MOMENTS = _by_off_gpu(moment_sums, moment_sums_xla, row_args=1, vector_args=0)


def _grad_sums(x: Array, dy: Array, mean: Array, a: Array, b: Array) -> tuple[Array, Array]:
    sums = GRAD_SUMS[_off_gpu](x, dy, mean, a, b)
    return sums[0], sums[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def batch_moments(xf: Array, storage_dtype) -> tuple[Array, Array]:
    """``mean(x)`` and ``mean(x * x)`` over the rows of ``xf`` (M, C), float32 (C,), through
    :func:`moment_sums` (on a GPU). ``xf`` is the float32 view of an activation stored in
    ``storage_dtype``: the kernel reads ``xf.astype(storage_dtype)``, which XLA folds back to
    the stored array (a widening convert and its inverse), and the derivatives meet the
    BatchNorm's other uses of ``xf`` in float32, so dx is summed once in float32 and
    converted once, as in the model. The tangent is written out as plain reductions,
    ``mean(t)`` and ``mean(2 x t)``: what autodiff of the model's ``jnp.mean`` gives."""
    sums = MOMENTS[_off_gpu](xf.astype(storage_dtype))
    return sums[0] / xf.shape[0], sums[1] / xf.shape[0]


@batch_moments.defjvp
def _batch_moments_jvp(storage_dtype, primals: tuple, tangents: tuple) -> tuple:
    (xf,), (tf,) = primals, tangents
    return batch_moments(xf, storage_dtype), (jnp.mean(tf, axis=0), jnp.mean(2 * xf * tf, axis=0))


# ---------------------------------------------------------------- BatchNorm + ReLU
@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def bn_relu_apply(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float, dtype) -> Array:
    """``relu((x - mean) * rsqrt(var + epsilon) * scale + bias)`` in ``dtype``; x is (..., C),
    the others float32 (C,). Its derivatives are written out (see the module docstring)."""
    a = jax.lax.rsqrt(var + epsilon) * scale
    return jnp.maximum((x.astype(jnp.float32) - mean) * a + bias, 0).astype(dtype)


def _bn_relu_apply_jvp(epsilon: float, dtype, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    y = bn_relu_apply(*primals, epsilon, dtype)
    # Only the tangents that are not symbolic zeros are linear arguments (a zero one would
    # be a constant, which linear_call cannot transpose); the transpose returns theirs.
    present = tuple(not isinstance(t, jax.custom_derivatives.SymbolicZero) for t in tangents)
    linear = tuple(t for t, p in zip(tangents, present) if p)

    def coefficients(res: tuple) -> tuple[Array, Array, Array, Array, Array]:
        x, mean, var, scale, bias = res
        inv = jax.lax.rsqrt(var + epsilon)
        return x.astype(jnp.float32) - mean, inv, inv * scale, scale, bias

    def tangent(res: tuple, lin: tuple) -> Array:
        centred, inv, a, scale, bias = coefficients(res)
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

    def transpose(res: tuple, ct: Array) -> tuple:
        x, mean, var, scale, bias = res
        inv = jax.lax.rsqrt(var + epsilon)
        a = inv * scale
        c = x.shape[-1]
        sum_g, sum_gc = _grad_sums(x.reshape(-1, c), ct.reshape(-1, c), mean, a, bias)
        # The barrier keeps XLA from merging this mask with the forward pass's (it would then
        # store the mask); dx is one loop fusion reading x and ct.
        mean_b, a_b, bias_b = jax.lax.optimization_barrier((mean, a, bias))
        centred = x.astype(jnp.float32) - mean_b
        ct_x = jnp.where(centred * a_b + bias_b > 0, ct.astype(jnp.float32) * a_b, 0.0).astype(x.dtype)
        cts = (ct_x, -sum_g * a, sum_gc * (-0.5 * scale * inv**3), sum_gc * inv, sum_g)
        return tuple(ct_i for ct_i, p in zip(cts, present) if p)

    return y, jax.custom_derivatives.linear_call(tangent, transpose, primals, linear)


bn_relu_apply.defjvp(_bn_relu_apply_jvp, symbolic_zeros=True)


def batch_norm_relu_train(
    x: Array, scale: Array, bias: Array, epsilon: float, dtype, activation: Callable | None = jax.nn.relu,
    *, pallas_stats: bool = False,
) -> tuple[Array, Array, Array]:
    """``activation(BatchNorm(x))`` with whole-batch statistics: ``layers._batch_norm_train``
    with ``group = N``. A ReLU (any of ``layers.RELUS``, the default) goes through
    :func:`bn_relu_apply`; another function or None (a BatchNorm before a residual add) gets
    the plain formula. ``pallas_stats``: the forward statistics through :func:`batch_moments`
    (the Pallas kernel on a GPU) instead of ``jnp.mean``. Returns the output in ``dtype`` and
    the float32 (1, C) mean and biased variance."""
    from resnet_jax.models.layers import RELUS

    c, xf = x.shape[-1], x.astype(jnp.float32)
    if pallas_stats:
        mean, mean_sq = batch_moments(xf.reshape(-1, c), x.dtype)
    else:
        axes = tuple(range(x.ndim - 1))
        mean, mean_sq = jnp.mean(xf, axis=axes), jnp.mean(jnp.square(xf), axis=axes)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if activation in RELUS:
        y = bn_relu_apply(x, mean, var, scale, bias, epsilon, dtype)
    else:
        y = ((xf - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
        y = y if activation is None else activation(y)
    return y, mean[None], var[None]


# What a benchmark may ask for: the model's own BatchNorm, the Pallas backward reductions of
# the ReLU BatchNorms, or those and the Pallas forward statistics of every BatchNorm.
CHOICES = ("model", "pallas", "pallas-stats")


@contextlib.contextmanager
def patched(off_gpu: str = "xla", stats: bool = False) -> Iterator[None]:
    """Within the block, models built and traced use :func:`batch_norm_relu_train` for every
    BatchNorm that carries a ReLU and takes whole-batch statistics; with ``stats``, also every
    other whole-batch BatchNorm, and all of them take their statistics from the Pallas
    kernel (:func:`batch_moments`). ``off_gpu`` picks the sums where the step is not lowered
    for a GPU (``xla`` or ``interpret``)."""
    global _off_gpu
    from resnet_jax.models import layers

    model_train = layers._batch_norm_train

    def train(x, scale, bias, group, epsilon, dtype, activation=None):
        if group == x.shape[0] and (stats or activation in layers.RELUS):
            return batch_norm_relu_train(x, scale, bias, epsilon, dtype, activation, pallas_stats=stats)
        return model_train(x, scale, bias, group, epsilon, dtype, activation)

    previous, _off_gpu = _off_gpu, off_gpu
    layers._batch_norm_train = train
    try:
        yield
    finally:
        layers._batch_norm_train, _off_gpu = model_train, previous


def batch_norm_relu(choice: str) -> contextlib.AbstractContextManager:
    """The BatchNorm a benchmark asks for (:data:`CHOICES`): ``"model"`` (the model's own,
    nothing patched), ``"pallas"`` (:func:`patched`) or ``"pallas-stats"`` (:func:`patched`
    with ``stats=True``); anything else is refused."""
    if choice not in CHOICES:
        raise ValueError(f"bn_relu must be one of {', '.join(map(repr, CHOICES))}, not {choice!r}")
    return contextlib.nullcontext() if choice == "model" else patched(stats=choice == "pallas-stats")


# ---------------------------------------------------------------- timing on the device
def resnet50_inner_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    """The NHWC shapes of ResNet-50's inner BatchNorm inputs at 224px, one per distinct shape."""
    return [(batch, 56, 56, 64), (batch, 28, 28, 128), (batch, 14, 14, 256), (batch, 7, 7, 512)]


def resnet50_batch_norm_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    """The NHWC shapes of every ResNet-50 BatchNorm input at 224px, one per distinct shape:
    the stem's, then each stage's inner (width) and outer (4 x width) ones."""
    stages = [(56, 64), (28, 128), (14, 256), (7, 512)]
    return [(batch, 112, 112, 64)] + [(batch, s, s, c) for s, w in stages for c in (w, 4 * w)]


def bn_relu_step(impl: str) -> Callable:
    """Forward + backward of one BatchNorm + ReLU: (x, scale, bias, ct) -> (y, dx, dscale, dbias).
    ``impl``: ``"model"``, ``"pallas"`` or ``"pallas-stats"`` (:data:`CHOICES`)."""

    def forward(x: Array, scale: Array, bias: Array) -> Array:
        if impl != "model":
            return batch_norm_relu_train(x, scale, bias, 1e-5, x.dtype, pallas_stats=impl == "pallas-stats")[0]
        from resnet_jax.models import layers

        return layers._batch_norm_train(x, scale, bias, x.shape[0], 1e-5, x.dtype, layers.relu)[0]

    def step(x: Array, scale: Array, bias: Array, ct: Array) -> tuple:
        y, pullback = jax.vjp(forward, x, scale, bias)
        return (y, *pullback(ct))

    return jax.jit(step)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--blocks", default="512x32x4,1024x32x4,512x64x8,256x32x4,512x32x8,512x16x8",
                   help="block sizes of both kernels, each timed alone at its largest ResNet-50 shape: "
                        "ROWSxSUB_ROWSxWARPS,...")
    a = p.parse_args(argv)
    from benchmarks.stem_variants import _median_ms

    dtype = jnp.dtype(a.dtype)
    kind = jax.devices()[0].device_kind
    rows = []

    def run_and_time(fn: Callable, args: Sequence[Array], **what: object) -> tuple[object, float] | None:
        """``fn(*args)`` and its median ms; a candidate that fails to compile or run is a result:
        its error row (``what`` names it) is printed, None returned, and the rest still timed."""
        try:
            out = fn(*args)
            return out, _median_ms(lambda: fn(*args), 3, a.repeats, a.inner)
        except Exception as e:
            print(json.dumps({**what, "error": str(e)[:300]}), flush=True)
            return None

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    for shape in resnet50_inner_shapes(a.batch_size):
        keys = jax.random.split(jax.random.key(0), 4)
        x = (jax.random.normal(keys[0], shape) + 0.3).astype(dtype)
        ct = jax.random.normal(keys[1], shape).astype(dtype)
        scale = 1 + 0.1 * jax.random.normal(keys[2], shape[-1:])
        bias = 0.1 * jax.random.normal(keys[3], shape[-1:])
        outs = {}
        for impl in CHOICES:
            what = {"part": "bn_relu", "impl": impl, "shape": list(shape)}
            if (timed := run_and_time(bn_relu_step(impl), (x, scale, bias, ct), **what)) is None:
                continue
            outs[impl], ms = timed
            diff = max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))) / (jnp.max(jnp.abs(u.astype(jnp.float32))) + 1e-30))
                       for u, v in zip(outs["model"], outs[impl]))
            emit({**what, "dtype": a.dtype, "device_kind": kind, "ms": round(ms, 4), "max_rel_diff_vs_model": diff})
    # every BatchNorm's forward statistics: the Pallas kernel (on a GPU; elsewhere XLA's own
    # reductions, so both rows time the same thing) against the model's XLA reductions
    moments = {"pallas": jax.jit(lambda x: MOMENTS["xla"](x)),
               "xla": jax.jit(lambda x: jnp.stack(moment_sums_xla(x)))}
    for shape in resnet50_batch_norm_shapes(a.batch_size):
        x2 = (jax.random.normal(jax.random.key(4), (shape[0] * shape[1] * shape[2], shape[3])) + 0.3).astype(dtype)
        want = moments["xla"](x2)
        for impl, fn in moments.items():
            what = {"part": "moments", "impl": impl, "shape": list(shape)}
            if (timed := run_and_time(fn, (x2,), **what)) is None:
                continue
            got, ms = timed
            diff = float(jnp.max(jnp.abs(got - want) / (jnp.abs(want) + 1e-6)))
            emit({**what, "ms": round(ms, 4), "gb_per_s": round(x2.size * dtype.itemsize / (ms * 1e-3) / 1e9),
                  "max_rel_diff_vs_xla": diff})
    # each kernel alone at its largest shape, for a few block sizes (Triton: a GPU only): the
    # backward sums at the largest inner shape, the moments at the stem's (the largest of all)
    blocks = list(filter(None, a.blocks.split(",")))
    if jax.default_backend() != "gpu":
        print(f"the kernels' block sizes ({', '.join(blocks)}) are timed on a GPU only", flush=True)
        blocks = []
    kernels = {}
    if blocks:
        n, h, w, c = resnet50_inner_shapes(a.batch_size)[0]
        x2, dy2 = (jax.random.normal(jax.random.key(k), (n * h * w, c)).astype(dtype) for k in (1, 2))
        zeros, ones = jnp.zeros((c,)), jnp.ones((c,))
        n, h, w, c = resnet50_batch_norm_shapes(a.batch_size)[0]
        x3 = (jax.random.normal(jax.random.key(3), (n * h * w, c)) + 0.3).astype(dtype)
        kernels = {"grad_sums_kernel": (relu_grad_sums, (x2, dy2), (zeros, ones, zeros)),
                   "moments_kernel": (moment_sums, (x3,), ())}
    for spec in blocks:
        block_rows, sub_rows, warps = map(int, spec.split("x"))
        for part, (kernel, matrices, vectors) in kernels.items():
            fn = jax.jit(functools.partial(kernel, block_rows=block_rows, sub_rows=sub_rows, num_warps=warps))
            if (timed := run_and_time(fn, (*matrices, *vectors), part=part, blocks=spec)) is None:
                continue
            ms = timed[1]
            gbps = sum(x.size * x.dtype.itemsize for x in matrices) / (ms * 1e-3) / 1e9
            emit({"part": part, "blocks": spec, "shape": list(matrices[0].shape), "ms": round(ms, 4),
                  "gb_per_s": round(gbps)})
    print(f"\nBatchNorm + ReLU forward + backward on {kind}, {a.dtype} (median ms; model's vs Pallas reductions), "
          "then the statistics alone (Pallas vs XLA), then both kernels' block sizes:")
    for r in rows:
        if r["part"] == "bn_relu":
            print(f"  {str(tuple(r['shape'])):<22}{r['impl']:<13}{r['ms']:>9.3f} ms  diff {r['max_rel_diff_vs_model']:.2g}")
        elif r["part"] == "moments":
            print(f"  stats {str(tuple(r['shape'])):<22}{r['impl']:<7}{r['ms']:>9.3f} ms  {r['gb_per_s']:>6} GB/s")
        else:
            print(f"  {r['part']:<17}{r['blocks']:<14}{r['ms']:>9.3f} ms  {r['gb_per_s']:>6} GB/s")


if __name__ == "__main__":
    main()
