"""Times the BatchNorms fused into the 1x1 convolutions (``resnet_jax.models.pallas_fused_conv``) on the device.

Three candidates (docs/performance.md, changes 9 to 11; change 15 in the tails): each
Bottleneck's bn2 + ReLU, conv3 and bn3's statistics as one Pallas kernel (a Triton GEMM with
the BatchNorm as its prologue and the statistics as its epilogue) with conv3's weight
gradient as another that recomputes the activation from bn2's input; bn3 in the same op, so
that conv3's two backward GEMMs compute bn3's input gradient as they load its output
gradient (never stored); and each conv1 as a Triton GEMM that sums bn1's statistics as it
stores its output (its backward stays cuDNN's). Compiled for the H100 here they take the
ResNet-50 step from 85.0 GiB to 81.6 (change 9), 79.0 (9 and 11), 84.1 (10) and 78.1 (all
three); with change 15, bn3's gradient without z, 9 and 11 take it to 72.9. Whether Triton
GEMMs run these shapes as fast as cuDNN and cuBLAS is what this measures:

- at ResNet-50's four bn2 + conv3 shapes, the block's forward + backward (bn2's statistics
  given, z's statistics out), as the model runs it on a GPU (``model``: the Pallas
  BatchNorm, cuDNN's 1x1 convolution, the statistics kernel) and fused (``fused``), with the
  difference over the 16 blocks;
- at the same shapes, the block's whole tail to its output (bn3, the shortcut's add and the
  ReLU) as the model runs it, with change 9 (``fused``), with change 11 (``fused-bn3``) and
  with change 15 (``fused-gram``) and with change 16 (``fused-residual``, whose reverse pass
  masks the output's gradient in the y^T g kernel: change 18);
- at ResNet-50's four conv1 shapes, conv1 + bn1 + ReLU forward + backward, as the model runs
  it (cuDNN, the statistics kernel, the Pallas BatchNorm) and with ``conv1x1_moments``;
- each kernel alone, at the first and last shapes, at a few block sizes (``--forward-blocks``,
  ``--wgrad-blocks``), with the bandwidth and tensor-core rate it reaches; the weight-gradient
  kernel also in change 18's masked form (``wgrad_masked``: dz and the ReLU's output read, the
  masked dz stored), at the first ``--wgrad-blocks``;
- with ``--full-step-model``, the whole train step as the model has it, then with changes 9
  and 10 (``bn_relu_pallas.batch_norm("fused-convs")``), with change 11 too (``"fused-all"``),
  and with those and the stem pool's candidate (``stem_variants.POOL_VARIANTS["planes"]``).

    python3 benchmarks/fused_conv_pallas.py --batch-size 256
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet_jax.models import pallas_batch_norm, pallas_fused_conv  # noqa: E402
from resnet_jax.models.pallas_fused_conv import (  # noqa: E402
    bn_relu_conv1x1, bn_relu_conv1x1_bn, conv1x1_moments, matmul_moments, weight_grad)

Array = jax.Array
EPSILON = 1e-5
# what each part compares, the model's first
IMPLS = {"block": ("model", "fused"), "tail_block": ("model", "fused", "fused-bn3", "fused-gram", "fused-residual"),
         "conv1_block": ("model", "fused")}
FORWARD_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES")
WGRAD_BLOCKS = ("BLOCK_K", "BLOCK_N", "SUB_ROWS", "NUM_WARPS", "PROGRAMS")


def parse_spec(spec: str, names: Sequence[str]) -> dict[str, int]:
    """``AxBxC...`` as the positive block parameters ``names`` (all of them), e.g. the forward
    kernel's ``128x128x64x8x2`` (BLOCK_M x BLOCK_N x BLOCK_K x NUM_WARPS x NUM_STAGES)."""
    try:
        values = [int(v) for v in spec.split("x")]
    except ValueError:
        values = []
    if len(values) != len(names) or min(values) < 1:
        raise ValueError(f"block spec {spec!r}: want {len(names)} positive integers, {'x'.join(names)}")
    return dict(zip(names, values))


def tail_block(impl: str, dtype, interpret: bool = False) -> Callable:
    """A Bottleneck's tail, bn2 + ReLU -> conv3 -> bn3 -> + shortcut -> ReLU, forward + backward:
    (x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut, ct_out) -> (out, its seven
    gradients and the shortcut's). ``model``: what the model runs on a GPU; ``fused``: change 9
    (:func:`block`'s fused op, bn3 in XLA with the statistics it returns); ``fused-bn3``: change
    11, ``pallas_fused_conv.bn_relu_conv1x1_bn``; ``fused-gram``: that op with change 15
    (``pallas_fused_conv.GRAM_BACKWARD``: bn3's gradient without reading z);
    ``fused-residual``: change 16, ``pallas_fused_conv.bn_relu_conv1x1_bn_add_relu`` (z never
    stored)."""

    def forward(x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut):
        if impl == "fused-residual":
            out, _, _ = pallas_fused_conv.bn_relu_conv1x1_bn_add_relu(
                x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut, EPSILON, EPSILON, dtype, interpret)
            return out
        if impl in ("fused-bn3", "fused-gram"):
            u, _, _ = bn_relu_conv1x1_bn(x, mean, var, scale, bias, kernel, next_scale, next_bias, EPSILON, EPSILON,
                                         dtype, interpret)
        else:
            zf, moments = block(impl, dtype, interpret, jit=False)(x, mean, var, scale, bias, kernel)
            mean3, var3 = moments[0], moments[1] - moments[0] * moments[0]
            u = ((zf - mean3) * (jax.lax.rsqrt(var3 + EPSILON) * next_scale) + next_bias).astype(dtype)
        return jax.nn.relu(u + shortcut)

    def step(x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut, ct_out):
        # the flag is read as the reverse pass is traced (jit traces this once, on the first call)
        gram, pallas_fused_conv.GRAM_BACKWARD = pallas_fused_conv.GRAM_BACKWARD, impl == "fused-gram"
        try:
            out, pullback = jax.vjp(forward, x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut)
            return (out, *pullback(ct_out))
        finally:
            pallas_fused_conv.GRAM_BACKWARD = gram

    return jax.jit(step)


def tail_operands(shape: tuple[int, ...], n: int, dtype) -> tuple[Array, ...]:
    x, mean, var, scale, bias, kernel, _, _ = block_operands(shape, n, dtype)
    keys = jax.random.split(jax.random.key(2), 4)
    next_scale = 1 + 0.1 * jax.random.normal(keys[0], (n,))
    next_bias = 0.1 * jax.random.normal(keys[1], (n,))
    out_shape = (*shape[:-1], n)
    shortcut = jax.nn.relu(jax.random.normal(keys[2], out_shape)).astype(dtype)
    return (x, mean, var, scale, bias, kernel, next_scale, next_bias, shortcut,
            jax.random.normal(keys[3], out_shape).astype(dtype))


def block(impl: str, dtype, interpret: bool = False, jit: bool = True) -> Callable:
    """bn2 + ReLU -> conv3 (1x1) -> z's statistics, forward + backward:
    (x, mean, var, scale, bias, kernel, ct_z, ct_moments) -> (z, moments, dx, dmean, dvar, dscale, dbias, dkernel).
    ``model``: what the model runs on a GPU; ``fused``: ``pallas_fused_conv.bn_relu_conv1x1``.
    ``interpret``: the kernels under the Pallas interpreter (the tests, on a CPU). ``jit=False``:
    the forward function alone, (x, mean, var, scale, bias, kernel) -> (z, moments)."""

    def forward(x, mean, var, scale, bias, kernel):
        if impl == "fused":
            z, moments = bn_relu_conv1x1(x, mean, var, scale, bias, kernel, EPSILON, dtype, interpret)
            return z, jnp.stack(moments)
        y = pallas_batch_norm.bn_relu_apply(x, mean, var, scale, bias, EPSILON, dtype, interpret)
        z = jax.lax.conv_general_dilated(y, kernel.astype(dtype), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        zf = z.astype(jnp.float32)
        return zf, jnp.stack(pallas_batch_norm.batch_moments(zf.reshape(-1, zf.shape[-1]), dtype, interpret))

    def step(x, mean, var, scale, bias, kernel, ct_z, ct_moments):
        out, pullback = jax.vjp(forward, x, mean, var, scale, bias, kernel)
        return (*out, *pullback((ct_z, ct_moments)))

    return jax.jit(step) if jit else forward


def conv1_block(impl: str, dtype, interpret: bool = False) -> Callable:
    """conv1 (1x1) -> bn1 + ReLU, forward + backward:
    (x, kernel, scale, bias, ct_y) -> (y, dx, dkernel, dscale, dbias). ``model``: what the model
    runs on a GPU (cuDNN's convolution, the statistics kernel, the Pallas BatchNorm);
    ``fused``: ``pallas_fused_conv.conv1x1_moments``, then the same BatchNorm."""

    def forward(x, kernel, scale, bias):
        if impl == "fused":
            z, (mean, mean_sq) = conv1x1_moments(x, kernel, dtype, interpret)
        else:
            z = jax.lax.conv_general_dilated(x, kernel.astype(dtype), (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            mean, mean_sq = pallas_batch_norm.batch_moments(z.astype(jnp.float32).reshape(-1, z.shape[-1]), dtype,
                                                            interpret)
        var = jnp.maximum(mean_sq - mean * mean, 0.0)
        return pallas_batch_norm.bn_relu_apply(z, mean, var, scale, bias, EPSILON, dtype, interpret)

    def step(x, kernel, scale, bias, ct_y):
        y, pullback = jax.vjp(forward, x, kernel, scale, bias)
        return (y, *pullback(ct_y))

    return jax.jit(step)


def conv1_shapes(batch: int) -> list[tuple[tuple[int, int, int, int], int]]:
    """ResNet-50's conv1 inputs (NHWC) at 224px and their output channels, one per stage (the
    stage's blocks after the first)."""
    return [((batch, s, s, 4 * w), w) for s, w in ((56, 64), (28, 128), (14, 256), (7, 512))]


def conv1_operands(shape: tuple[int, ...], n: int, dtype) -> tuple[Array, ...]:
    keys = jax.random.split(jax.random.key(1), 5)
    k = shape[-1]
    x = jax.nn.relu(jax.random.normal(keys[0], shape)).astype(dtype)  # a block's output, after its ReLU
    kernel = jax.random.normal(keys[1], (1, 1, k, n)) * (2 / n) ** 0.5
    scale = 1 + 0.1 * jax.random.normal(keys[2], (n,))
    bias = 0.1 * jax.random.normal(keys[3], (n,))
    return x, kernel, scale, bias, jax.random.normal(keys[4], (*shape[:-1], n)).astype(dtype)


def block_shapes(batch: int) -> list[tuple[tuple[int, int, int, int], int]]:
    """ResNet-50's bn2 inputs (NHWC) at 224px and conv3's output channels, one per stage."""
    return [((batch, s, s, w), 4 * w) for s, w in ((56, 64), (28, 128), (14, 256), (7, 512))]


def block_operands(shape: tuple[int, ...], n: int, dtype) -> tuple[Array, ...]:
    keys = jax.random.split(jax.random.key(0), 6)
    k = shape[-1]
    x = (jax.random.normal(keys[0], shape) + 0.3).astype(dtype)
    xf = x.astype(jnp.float32).reshape(-1, k)
    mean, var = jnp.mean(xf, 0), jnp.var(xf, 0)
    scale = 1 + 0.1 * jax.random.normal(keys[1], (k,))
    bias = 0.1 * jax.random.normal(keys[2], (k,))
    kernel = jax.random.normal(keys[3], (1, 1, k, n)) * (2 / n) ** 0.5
    ct_z = jax.random.normal(keys[4], (*shape[:-1], n)).astype(jnp.float32)
    ct_moments = 1e-3 * jax.random.normal(keys[5], (2, n))
    return x, mean, var, scale, bias, kernel, ct_z, ct_moments


def _max_rel_diff(a: Sequence[Array], b: Sequence[Array]) -> float:
    return max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)))
                     / (float(jnp.max(jnp.abs(u.astype(jnp.float32)))) + 1e-30)) for u, v in zip(a, b))


def full_steps(model: str, batch: int, image: int, dtype_name: str, steps: int) -> list[dict]:
    """The whole train step as the model has it, with changes 9 and 10 (``fused-convs``), with
    change 11 too (``fused-all``), and with those and the stem pool's candidate (change 7):
    images/s against the model's, and the largest loss difference. Each run after the first
    adds one change, so the differences attribute them (change 9 alone: the block timings)."""
    from benchmarks.stem_variants import compare_runs, full_step

    runs = [({"part": "train_step", "model": model, "bn_relu": bn, "pool": pool or "model's"},
             functools.partial(full_step, model, batch, image, dtype_name, steps, None, pool, bn))
            for bn, pool in (("model", None), ("fused-convs", None), ("fused-all", None), ("fused-all", "planes"))]
    return compare_runs(runs, "model", batch, image, dtype_name)


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.stem_variants import _median_ms, timing_parser

    p = timing_parser(__doc__)
    p.add_argument("--forward-blocks", default="128x128x64x8x2,64x128x64x4x2,128x256x64x8x2,128x128x64x8x3,"
                                               "256x128x64x8x2",
                   help="the forward kernel alone at these blocks, BLOCK_MxBLOCK_NxBLOCK_KxNUM_WARPSxNUM_STAGES "
                        "(the module's: 128x128x64x8x2)")
    p.add_argument("--wgrad-blocks", default="64x128x32x4x528,128x128x32x8x528,64x128x64x4x528,64x128x32x4x264",
                   help="the weight-gradient kernel alone at these blocks, BLOCK_KxBLOCK_NxSUB_ROWSxNUM_WARPSxPROGRAMS "
                        "(the module's: 64x128x32x4x528)")
    p.add_argument("--full-step-model", default="none",
                   help="then the whole train step of this model with and without the fused block ('none': skip)")
    p.add_argument("--full-step-image-size", type=int, default=224)
    p.add_argument("--full-step-steps", type=int, default=50)
    a = p.parse_args(argv)
    try:
        forward_specs = [parse_spec(s, FORWARD_BLOCKS) for s in filter(None, a.forward_blocks.split(","))]
        wgrad_specs = [parse_spec(s, WGRAD_BLOCKS) for s in filter(None, a.wgrad_blocks.split(","))]
    except ValueError as e:
        p.error(str(e))
    dtype = jnp.dtype(a.dtype)
    kind = jax.devices()[0].device_kind
    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    def timed(fn: Callable, args: Sequence[Array], **what: object) -> tuple[object, float] | None:
        """``fn(*args)`` and its median ms, or None after printing an error row: a candidate
        that fails on the device is a result, and the rest still run."""
        try:
            return fn(*args), _median_ms(lambda: fn(*args), 3, a.repeats, a.inner)
        except Exception as e:
            print(json.dumps({**what, "error": str(e)[:300]}), flush=True)
            return None

    on_gpu = jax.default_backend() == "gpu"
    cases = [("block", block, block_operands, shape, n) for shape, n in block_shapes(a.batch_size)]
    cases += [("tail_block", tail_block, tail_operands, shape, n) for shape, n in block_shapes(a.batch_size)]
    cases += [("conv1_block", conv1_block, conv1_operands, shape, n) for shape, n in conv1_shapes(a.batch_size)]
    for part, make, make_operands, shape, n in cases if on_gpu else ():
        operands = make_operands(shape, n, dtype)
        outs = {}
        for impl in IMPLS[part]:
            what = {"part": part, "impl": impl, "shape": list(shape), "out_channels": n}
            if (result := timed(make(impl, dtype), operands, **what)) is None:
                continue
            outs[impl], ms = result
            row = {**what, "dtype": a.dtype, "device_kind": kind, "ms": round(ms, 4)}
            if "model" in outs and impl != "model":
                row["max_rel_diff_vs_model"] = _max_rel_diff(outs["model"], outs[impl])
            emit(row)
    if not on_gpu:
        print("the blocks and kernels are timed on a GPU only (Triton)", flush=True)
    for shape, n in [block_shapes(a.batch_size)[i] for i in (0, -1)] if on_gpu else []:
        x, mean, var, scale, bias, kernel, ct_z, _ = block_operands(shape, n, dtype)
        m, k = x.size // shape[-1], shape[-1]
        x2, w, dz = x.reshape(m, k), kernel.reshape(k, n).astype(dtype), ct_z.reshape(m, n).astype(dtype)
        a_vec = jax.lax.rsqrt(var + EPSILON) * scale
        flops = 2 * m * k * n
        # each kernel reads an (M, K) and writes or reads an (M, N) array: the bytes it must move
        # (the masked weight gradient of changes 16-18 reads two (M, N) arrays and writes a third)
        moved = (m * k + m * n) * dtype.itemsize
        kernels = [("forward_kernel", spec, (x2, mean, a_vec, bias, w), functools.partial(
                        matmul_moments, out_dtype=dtype, block_m=spec["BLOCK_M"], block_n=spec["BLOCK_N"],
                        block_k=spec["BLOCK_K"], num_warps=spec["NUM_WARPS"], num_stages=spec["NUM_STAGES"]), moved)
                   for spec in forward_specs]
        for form, dz_arg, nbytes in (("wgrad_kernel", dz, moved),
                                     ("wgrad_masked", (dz, jnp.maximum(dz, 0)), moved + 2 * m * n * dtype.itemsize)):
            kernels += [(form, spec, (x2, mean, a_vec, bias, dz_arg), functools.partial(
                             weight_grad, block_k=spec["BLOCK_K"], block_n=spec["BLOCK_N"],
                             sub_rows=spec["SUB_ROWS"], num_warps=spec["NUM_WARPS"], programs=spec["PROGRAMS"]),
                         nbytes)
                        for spec in (wgrad_specs if form == "wgrad_kernel" else wgrad_specs[:1])]
        for part, spec, args, kernel_fn, nbytes in kernels:
            blocks = "x".join(str(v) for v in spec.values())
            if (result := timed(jax.jit(kernel_fn), args, part=part, blocks=blocks)) is None:
                continue
            ms = result[1]
            emit({"part": part, "blocks": blocks, "shape": [m, k, n], "ms": round(ms, 4),
                  "gb_per_s": round(nbytes / (ms * 1e-3) / 1e9),
                  "tflop_per_s": round(flops / (ms * 1e-3) / 1e12)})
    print(f"\nforward + backward on {kind}, {a.dtype} (median ms): bn2 + ReLU -> conv3 -> z's statistics "
          "(model: Pallas BatchNorm + cuDNN + statistics kernel, fused: one Pallas GEMM each way), the same to the "
          "block's output (tail_block; fused-bn3: bn3 in the op, its gradient computed in the backward GEMMs; "
          "fused-gram: the same without reading z; fused-residual: z never stored), "
          "conv1 -> bn1 + ReLU (model: cuDNN + statistics kernel, fused: a Pallas GEMM summing them), then each "
          "kernel alone:")
    for r in rows:
        if r["part"] in IMPLS:
            print(f"  {r['part']:<12}{str(tuple(r['shape'])):<22}-> {r['out_channels']:<5}{r['impl']:<7}"
                  f"{r['ms']:>9.3f} ms" + (f"  diff {r['max_rel_diff_vs_model']:.2g}" if "max_rel_diff_vs_model" in r else ""))
        else:
            print(f"  {r['part']:<15}{r['blocks']:<18}{str(tuple(r['shape'])):<24}{r['ms']:>8.3f} ms "
                  f"{r['gb_per_s']:>6} GB/s {r['tflop_per_s']:>5} TFLOP/s")
    # ResNet-50's blocks per stage (each stage's first conv1 has another input width: counted
    # at the others' shape, so the conv1 figure is an estimate)
    for part, shapes, impl, what in (("block", block_shapes, "fused", "bn2 + conv3"),
                                     ("tail_block", block_shapes, "fused", "tails, bn3 outside"),
                                     ("tail_block", block_shapes, "fused-bn3", "tails, bn3 inside"),
                                     ("tail_block", block_shapes, "fused-gram", "tails, bn3 inside, without z"),
                                     ("tail_block", block_shapes, "fused-residual", "tails, z never stored"),
                                     ("conv1_block", conv1_shapes, "fused", "conv1 + bn1")):
        by_shape = {(tuple(r["shape"]), r["impl"]): r["ms"] for r in rows if r["part"] == part}
        stage_ms = [(by_shape.get((tuple(s), "model")), by_shape.get((tuple(s), impl))) for s, _ in shapes(a.batch_size)]
        if all(m is not None and f is not None for m, f in stage_ms):
            saved = sum(count * (m - f) for count, (m, f) in zip((3, 4, 6, 3), stage_ms))
            print(f"  ResNet-50's 16 {what}: {saved:+.2f} ms per step {impl} (positive: faster than the model's)")
    if a.full_step_model != "none":
        steps = full_steps(a.full_step_model, a.batch_size, a.full_step_image_size, a.dtype, a.full_step_steps)
        print(f"\nwhole {a.full_step_model} train step, batch {a.batch_size} @{a.full_step_image_size}px {a.dtype}:")
        for r in steps:
            print(f"  bn {r['bn_relu']:<11}pool {r['pool']:<8}{r['images_per_second']:>10.1f} images/s "
                  f"{r['vs_model']:>7.3f}x  peak {r['peak_memory_gib'] or 0:.2f} GiB  "
                  f"compiled in {r['compile_seconds'] or 0:.1f} s  max loss diff {r['max_loss_diff_vs_model']:.2g}")


if __name__ == "__main__":
    main()
