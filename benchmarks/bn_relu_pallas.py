"""Times the model's Pallas BatchNorm kernels (``resnet_jax.models.pallas_batch_norm``) on the device.

On an NVIDIA GPU every whole-batch BatchNorm takes its forward statistics from a Pallas kernel,
and a BatchNorm + ReLU sums its backward reductions in another, which reads x and dy and
recomputes the ReLU mask (5 passes over the activation where XLA's fusions make 7). Timed on
an H100 (2026-11-26, docs/performance.md) they made the ResNet-50 step 1.044x faster, so
they are the model's GPU path. This script times, at ResNet-50's shapes:

- BatchNorm + ReLU forward and backward at the 4 inner shapes, three ways (:data:`CHOICES`):
  ``model`` (both kernels, what the model runs on a GPU), ``xla`` (XLA's reductions, the
  model off a GPU: ``layers.batch_norm_train_xla``) and ``pallas`` (the backward kernel
  with XLA's statistics);
- the statistics kernel against XLA's reductions at every BatchNorm shape;
- both kernels alone at a few block sizes and pipelining depths (``--blocks``; their register
  use, compiled for the H100 without one, is in docs/performance.md);
- with ``--full-step-blocks``, the whole train step with the default blocks and with others
  (:func:`kernel_blocks` patches them in).

:func:`batch_norm` patches a choice into the model for a benchmark's run
(``stem_variants.py``, ``gpu_compile_report.py --bn-relu``):

    python3 benchmarks/bn_relu_pallas.py --batch-size 256
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet_jax.models import blocks, layers, pallas_batch_norm  # noqa: E402
from resnet_jax.models.pallas_batch_norm import moment_sums, relu_grad_sums  # noqa: E402

Array = jax.Array

# The BatchNorms this script times: the model's own (on a GPU both Pallas kernels), XLA's
# reductions everywhere (the model before 2026-11-26), or the backward kernel alone.
CHOICES = ("model", "xla", "pallas")
# What a whole-step benchmark may ask for: those, or the model's with candidates that fuse a
# BatchNorm into a Bottleneck's 1x1 convolutions (``pallas_fused_conv``; ``fused_conv_pallas.py``
# times them): ``fused-conv``, bn2 + ReLU, conv3 and bn3's statistics as one kernel
# (``blocks.FUSE_BN2_CONV3``, change 9); ``fused-conv1``, conv1 summing bn1's statistics
# (``blocks.FUSE_CONV1_BN1``, change 10); ``fused-convs``, both; ``fused-bn3``, ``fused-conv`` with
# bn3 in the same op (``blocks.FUSE_BN3``, change 11); ``fused-all``, the three.
STEP_CHOICES = (*CHOICES, "fused-conv", "fused-conv1", "fused-convs", "fused-bn3", "fused-all")


@contextlib.contextmanager
def batch_norm(choice: str) -> Iterator[None]:
    """Within the block, models built and traced use the BatchNorm ``choice``
    (:data:`STEP_CHOICES`) in training mode; anything else is refused. ``xla`` swaps ``layers.batch_norm_train_xla``
    in for the per-platform choice; ``pallas`` keeps that choice and turns the GPU path's
    statistics kernel off (``kernel_statistics=False``); the ``fused-*`` choices set
    ``blocks.FUSE_BN2_CONV3``, ``blocks.FUSE_CONV1_BN1`` and ``blocks.FUSE_BN3`` as above."""
    if choice not in STEP_CHOICES:
        raise ValueError(f"bn_relu must be one of {', '.join(map(repr, STEP_CHOICES))}, not {choice!r}")
    fuse_conv3, fuse_conv1, fuse_bn3 = ((blocks, name, True) for name in ("FUSE_BN2_CONV3", "FUSE_CONV1_BN1",
                                                                          "FUSE_BN3"))
    patches = {
        "model": [(layers, "_batch_norm_train", layers._batch_norm_train)],
        "xla": [(layers, "_batch_norm_train", layers.batch_norm_train_xla)],
        "pallas": [(pallas_batch_norm, "batch_norm_train",
                    functools.partial(pallas_batch_norm.batch_norm_train, kernel_statistics=False))],
        "fused-conv": [fuse_conv3],
        "fused-conv1": [fuse_conv1],
        "fused-convs": [fuse_conv3, fuse_conv1],
        "fused-bn3": [fuse_conv3, fuse_bn3],
        "fused-all": [fuse_conv3, fuse_conv1, fuse_bn3],
    }[choice]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, replacement in patches:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


BLOCK_PARAMETERS = ("BLOCK_ROWS", "SUB_ROWS", "NUM_WARPS", "NUM_STAGES", "BLOCK_CHANNELS", "MIN_PROGRAMS")


def parse_blocks(spec: str) -> dict[str, int]:
    """``ROWSxSUB_ROWSxWARPS[xSTAGES[xCHANNELS[xMIN_PROGRAMS]]]`` (e.g. ``512x32x4x3``) as the
    ``pallas_batch_norm`` block parameters it sets; the ones left out keep the module's.
    MIN_PROGRAMS may be 0 (off); the others are positive."""
    try:
        values = [int(v) for v in spec.split("x")]
    except ValueError:
        values = []
    if not 3 <= len(values) <= 6 or min(values[:5]) < 1 or min(values) < 0:
        raise ValueError(f"block spec {spec!r} is not ROWSxSUB_ROWSxWARPS[xSTAGES[xCHANNELS[xMIN_PROGRAMS]]] "
                         "of positive integers (MIN_PROGRAMS may be 0)")
    return dict(zip(BLOCK_PARAMETERS, values))


@contextlib.contextmanager
def kernel_blocks(spec: str) -> Iterator[None]:
    """Within the block, the Pallas kernels traced use the block parameters of ``spec``
    (:func:`parse_blocks`) instead of ``pallas_batch_norm``'s defaults."""
    patch = parse_blocks(spec)
    original = {name: getattr(pallas_batch_norm, name) for name in patch}
    for name, value in patch.items():
        setattr(pallas_batch_norm, name, value)
    try:
        yield
    finally:
        for name, value in original.items():
            setattr(pallas_batch_norm, name, value)


def full_steps_with_blocks(model: str, batch: int, image: int, dtype_name: str, steps: int,
                           specs: Sequence[str]) -> list[dict]:
    """The whole train step of ``model`` with the kernels' default blocks, then with each of
    ``specs`` patched in: images/s against the default's, and the largest loss difference."""
    from benchmarks.stem_variants import compare_runs, full_step

    def run(spec: str) -> dict:
        with contextlib.nullcontext() if spec == "default" else kernel_blocks(spec):
            return full_step(model, batch, image, dtype_name, steps)

    runs = [({"part": "train_step", "model": model, "blocks": spec}, functools.partial(run, spec))
            for spec in ("default", *specs)]
    return compare_runs(runs, "default", batch, image, dtype_name)


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
    ``impl``: one of :data:`CHOICES`."""

    def forward(x: Array, scale: Array, bias: Array) -> Array:
        with batch_norm(impl):
            return layers._batch_norm_train(x, scale, bias, x.shape[0], 1e-5, x.dtype, layers.relu)[0]

    def step(x: Array, scale: Array, bias: Array, ct: Array) -> tuple:
        y, pullback = jax.vjp(forward, x, scale, bias)
        return (y, *pullback(ct))

    return jax.jit(step)


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.stem_variants import timing_parser

    p = timing_parser(__doc__)
    p.add_argument("--blocks", default="512x32x4,512x32x4x3,512x32x4x2x128x528,512x32x4x2x128x1056,"
                                       "256x32x4x2x128x1056",
                   help="block parameters of both kernels, each timed alone at its largest ResNet-50 shape: "
                        "ROWSxSUB_ROWSxWARPS[xSTAGES[xCHANNELS[xMIN_PROGRAMS]]],... (the model's: 512x32x4x2x128x0)")
    p.add_argument("--full-step-blocks", default="",
                   help="then time the whole train step of --full-step-model with the default blocks and with "
                        "each of these (same spec, comma-separated)")
    p.add_argument("--full-step-model", default="resnet50")
    p.add_argument("--full-step-image-size", type=int, default=224)
    p.add_argument("--full-step-steps", type=int, default=50)
    a = p.parse_args(argv)
    for spec in filter(None, (a.blocks + "," + a.full_step_blocks).split(",")):
        try:
            parse_blocks(spec)
        except ValueError as e:
            p.error(str(e))
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
    # reductions, so both rows time the same thing) against XLA's reductions
    def xla_moments(x: Array) -> Array:
        xf = x.astype(jnp.float32)
        return jnp.stack([jnp.sum(xf, axis=0), jnp.sum(xf * xf, axis=0)])

    moments = {"pallas": jax.jit(lambda x: jax.lax.platform_dependent(
                   x, cuda=lambda x: jnp.stack(moment_sums(x)), default=xla_moments)),
               "xla": jax.jit(xla_moments)}
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
    # each kernel alone for a few block sizes (Triton: a GPU only), at its largest shape and at
    # a small one: the backward sums at the largest inner shape and at 7x7x512, the moments at
    # the stem's (the largest of all) and at 14x14x256 (~200 instances with the default blocks)
    blocks = list(filter(None, a.blocks.split(",")))
    if jax.default_backend() != "gpu":
        print(f"the kernels' block sizes ({', '.join(blocks)}) are timed on a GPU only", flush=True)
        blocks = []
    kernels = {}
    if blocks:
        n, h, w, c = resnet50_inner_shapes(a.batch_size)[0]
        x2, dy2 = (jax.random.normal(jax.random.key(k), (n * h * w, c)).astype(dtype) for k in (1, 2))
        zeros, ones = jnp.zeros((c,)), jnp.ones((c,))
        n, h, w, c = resnet50_inner_shapes(a.batch_size)[-1]
        x4, dy4 = (jax.random.normal(jax.random.key(k), (n * h * w, c)).astype(dtype) for k in (5, 6))
        zeros4, ones4 = jnp.zeros((c,)), jnp.ones((c,))
        n, h, w, c = resnet50_batch_norm_shapes(a.batch_size)[0]
        x3 = (jax.random.normal(jax.random.key(3), (n * h * w, c)) + 0.3).astype(dtype)
        n, h, w, c = resnet50_batch_norm_shapes(a.batch_size)[5]
        x5 = (jax.random.normal(jax.random.key(7), (n * h * w, c)) + 0.3).astype(dtype)
        kernels = {"grad_sums_kernel": (relu_grad_sums, (x2, dy2), (zeros, ones, zeros)),
                   "grad_sums_kernel_small": (relu_grad_sums, (x4, dy4), (zeros4, ones4, zeros4)),
                   "moments_kernel": (moment_sums, (x3,), ()),
                   "moments_kernel_small": (moment_sums, (x5,), ())}
    for spec in blocks:
        for part, (kernel, matrices, vectors) in kernels.items():
            fn = jax.jit(functools.partial(kernel))  # a new function: traced afresh, inside the patch
            with kernel_blocks(spec):
                timed = run_and_time(fn, (*matrices, *vectors), part=part, blocks=spec)
            if timed is None:
                continue
            ms = timed[1]
            gbps = sum(x.size * x.dtype.itemsize for x in matrices) / (ms * 1e-3) / 1e9
            emit({"part": part, "blocks": spec, "shape": list(matrices[0].shape), "ms": round(ms, 4),
                  "gb_per_s": round(gbps)})
    print(f"\nBatchNorm + ReLU forward + backward on {kind}, {a.dtype} (median ms; model: both Pallas kernels, xla: XLA's reductions, pallas: the backward kernel alone), "
          "then the statistics alone (Pallas vs XLA), then both kernels' block sizes:")
    for r in rows:
        if r["part"] == "bn_relu":
            print(f"  {str(tuple(r['shape'])):<22}{r['impl']:<13}{r['ms']:>9.3f} ms  diff {r['max_rel_diff_vs_model']:.2g}")
        elif r["part"] == "moments":
            print(f"  stats {str(tuple(r['shape'])):<22}{r['impl']:<7}{r['ms']:>9.3f} ms  {r['gb_per_s']:>6} GB/s")
        else:
            print(f"  {r['part']:<17}{r['blocks']:<16}{r['ms']:>9.3f} ms  {r['gb_per_s']:>6} GB/s")
    specs = list(filter(None, a.full_step_blocks.split(",")))
    if specs:
        steps = full_steps_with_blocks(a.full_step_model, a.batch_size, a.full_step_image_size, a.dtype,
                                       a.full_step_steps, specs)
        print(f"\nwhole {a.full_step_model} train step, batch {a.batch_size} @{a.full_step_image_size}px {a.dtype}, "
              "by the kernels' blocks:")
        for r in steps:
            print(f"  {r['blocks']:<16}{r['images_per_second']:>10.1f} images/s {r['vs_default']:>7.3f}x  "
                  f"max loss diff {r['max_loss_diff_vs_default']:.2g}")


if __name__ == "__main__":
    main()
