"""The stem's kernels, timed in isolation on the device, and each of the step's GPU kernel choices
undone in turn: what each is worth where it counts.

The H200 profile of the ResNet-50 step (docs/performance.md, "Our figures") put 4.9 ms of
its 36.4 ms in the stem, ~3.4 ms more than its bytes need: the 7x7/2 convolution over 3
input channels (a reduction of 147 that fits no tensor-core tile), and BatchNorm apply + the
3x3/2 max pool with nine strided slices (instruction-bound). The candidates below were timed
on an H100 (2026-11-26); the fastest of each part is now what the model runs on a GPU
(``layers.conv_7x7_s2``, ``layers.max_pool_3x3_s2``). This script times each part's
candidates, forward and backward together, at the step's shapes, and checks each against
the first listed on the same inputs:

stem convolution (forward + weight gradient; the image needs no gradient):
  ``direct``          ``layers.conv_7x7_s2_direct``: 7x7/2 over 3 channels (cuDNN; the model
                      off a GPU)
  ``pad4``, ``pad8``  input and kernel zero-padded to 4 or 8 channels (NVIDIA's MLPerf stem
                      pads to 4 for cuDNN's first-layer kernels)
  ``s2d``, ``s2d16``  ``layers.conv_7x7_s2_space_to_depth``: each 2x2 block of pixels folded
                      into the channels, a 4x4 stride-1 convolution over 12 channels (or 16,
                      zero-padded; the model on a GPU) with the kernel rearranged to match

BatchNorm apply + max pool 3x3/2 + ReLU (forward + input gradient):
  ``xla``             ``nn.max_pool``: reduce-window, select-and-scatter backward (the flax
                      peer; the model off a GPU)
  ``slices``          :func:`max_pool_fused_gradient`: the derivative as nine strided slices
                      (the model on a GPU before 2026-11-26)
  ``parity``          ``layers.max_pool_parity``: the same derivative, with the input viewed
                      as 2x2 parity planes (the model on a GPU)
  ``planes``          ``layers.max_pool_planes``: the same, with the reverse pass written
                      out plane by plane (9 terms per 2x2 block where XLA's transpose of
                      ``parity`` adds 9 per element: 1.31 ms at 430 GB/s in the H100 step)

BatchNorm in training (statistics included) + max pool + ReLU (forward + x, scale, bias gradients):
  ``layers``          the model's Pallas BatchNorm, then ``max_pool_parity`` and ReLU (the model
                      on a GPU)
  ``fused``           ``pallas_batch_norm.bn_pool_relu_train``: one op whose backward kernels
                      build the pool's gradient in registers (docs/performance.md, change 22)

Every candidate computes the same function: the convolutions agree to float32 rounding, and
the pools agree exactly (max is exact, and all three route the gradient to the first maximum
of the window in row-major order), the training BatchNorms to bf16 rounding (the fused op adds
the pool's gradient in float32). The tests check this on CPU. On the device, one line per
candidate: ``{"part", "variant", "ms", "vs_current", "max_rel_diff_vs_first"}``, then a table.

Then the whole train step (``resnet-jax benchmark``'s measurement, ResNet-50 by default) as
the model has it, with the ``planes`` pool, then with each of its GPU choices undone (the direct convolution, the
strided-slice pool, XLA's BatchNorm reductions in place of ``pallas_batch_norm``'s kernels),
then with all three undone (the step before 2026-11-26), patched for that run only
(:func:`full_step`): images/s against the model's, and the largest loss difference.
``device_benchmark.sh`` runs all of it as the ``stem-variants/`` job:

    python3 benchmarks/stem_variants.py --batch-size 256 --image-size 224
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet_jax.models import layers  # noqa: E402

Array = jax.Array


# ---------------------------------------------------------------- stem convolution candidates
def conv_pad_channels(x: Array, kernel: Array, channels: int) -> Array:
    """The 7x7/2 stem convolution with the input channels zero-padded to ``channels`` (kernel likewise)."""
    extra = channels - x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return layers.conv_7x7_s2_direct(x, kernel)


CONV_VARIANTS: dict[str, Callable[[Array, Array], Array]] = {
    "direct": layers.conv_7x7_s2_direct,
    "pad4": functools.partial(conv_pad_channels, channels=4),
    "pad8": functools.partial(conv_pad_channels, channels=8),
    "s2d": functools.partial(layers.conv_7x7_s2_space_to_depth, channels=None),
    "s2d16": functools.partial(layers.conv_7x7_s2_space_to_depth, channels=16),
}
CURRENT = {"stem_conv": "s2d16", "bn_max_pool_relu": "parity", "bn_pool_relu_train": "layers"}  # what a GPU runs


# ---------------------------------------------------------------- max pool candidates
@jax.custom_jvp
def max_pool_fused_gradient(x: Array) -> Array:
    """``nn.max_pool`` 3x3/2 (padding 1) with its derivative written as nine strided slices of
    the input compared with the output: the first maximum of each window in row-major order,
    as ``nn.max_pool``'s. What the model ran on a GPU before ``layers.max_pool_parity``
    (docs/performance.md, change 3): 1.1 GiB of traffic where ``nn.max_pool`` moves 4.6,
    but instruction-bound (index arithmetic per element for each of the nine slices)."""
    return layers._max_pool(x)


@max_pool_fused_gradient.defjvp
def _max_pool_fused_gradient_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y = layers._max_pool(x)
    n, h, w, c = y.shape
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    x_padded = jnp.pad(x, padding, constant_values=-jnp.inf)
    t_padded = jnp.pad(t, padding)
    # Index (0..8, row-major) of the first maximum of each window: 9 means "not found yet".
    first_max = jnp.full(y.shape, 9, jnp.int8)
    windows_t = []
    for k in range(9):
        di, dj = divmod(k, 3)
        start, limit = (0, di, dj, 0), (n, di + 2 * h - 1, dj + 2 * w - 1, c)
        window_x = jax.lax.slice(x_padded, start, limit, (1, 2, 2, 1))
        first_max = jnp.where((first_max == 9) & (window_x == y), jnp.int8(k), first_max)
        windows_t.append(jax.lax.slice(t_padded, start, limit, (1, 2, 2, 1)))
    t_out = jnp.zeros(y.shape, t.dtype)
    for k, window_t in enumerate(windows_t):
        t_out = t_out + jnp.where(first_max == k, window_t, jnp.zeros_like(window_t))
    return y, t_out


POOL_VARIANTS: dict[str, Callable[[Array], Array]] = {
    "xla": layers._max_pool,
    "slices": max_pool_fused_gradient,
    "parity": layers.max_pool_parity,
    "planes": layers.max_pool_planes,
}


# ---------------------------------------------------------------- the training BatchNorm with them
def _interpret() -> bool:
    return jax.default_backend() != "gpu"  # the Pallas kernels under the interpreter off a GPU (the tests)


def bn_pool_relu_layers(x: Array, scale: Array, bias: Array, dtype) -> Array:
    """The stem's BatchNorm in training (the model's Pallas statistics and backward sums), then
    ``max_pool_parity`` and ReLU: what the model runs on a GPU."""
    from resnet_jax.models import pallas_batch_norm

    y = pallas_batch_norm.batch_norm_train(x, scale, bias, 1e-5, dtype, None, interpret=_interpret())[0]
    return jax.nn.relu(layers.max_pool_parity(y))


def bn_pool_relu_fused(x: Array, scale: Array, bias: Array, dtype) -> Array:
    """The same as one op (``layers.FUSE_STEM_POOL``, docs/performance.md change 22)."""
    from resnet_jax.models import pallas_batch_norm

    return pallas_batch_norm.bn_pool_relu_train(x, scale, bias, 1e-5, dtype, _interpret())[0]


TRAIN_VARIANTS: dict[str, Callable[..., Array]] = {"layers": bn_pool_relu_layers, "fused": bn_pool_relu_fused}


# ---------------------------------------------------------------- in the whole train step
def full_step(model: str, batch: int, image: int, dtype_name: str, steps: int,
              conv_variant: str | None = None, pool_variant: str | None = None, bn: str = "model") -> dict:
    """``resnet-jax benchmark``'s measurement of the whole train step of ``model``, with the
    stem's 7x7/2 convolution computed by ``conv_variant`` and its max pool by
    ``pool_variant`` (None: the model's own), and the BatchNorms as ``bn`` (one of
    ``bn_relu_pallas.STEP_CHOICES``), patched in for this call only."""
    from benchmarks import bn_relu_pallas
    from resnet_jax.train.benchmark import benchmark_config, measure

    model_conv, model_pool = layers.conv_7x7_s2, layers.max_pool_3x3_s2
    try:
        if conv_variant:
            layers.conv_7x7_s2 = CONV_VARIANTS[conv_variant]
        if pool_variant:
            layers.max_pool_3x3_s2 = POOL_VARIANTS[pool_variant]
        with bn_relu_pallas.batch_norm(bn):
            return measure(benchmark_config(model, batch, image, dtype_name), steps=steps)
    finally:
        layers.conv_7x7_s2, layers.max_pool_3x3_s2 = model_conv, model_pool


# The step as the model has it, with the candidate pool, then each GPU choice undone, then all
# three: (conv, pool, BatchNorm).
ABLATIONS = ((None, None, "model"), (None, "planes", "model"), ("direct", None, "model"), (None, "slices", "model"),
             (None, None, "xla"), ("direct", "slices", "xla"))


def full_steps(model: str, batch: int, image: int, dtype_name: str, steps: int,
               ablations: Sequence[tuple[str | None, str | None, str]] = ABLATIONS) -> list[dict]:
    """The whole step as the model has it, then each of ``ablations`` (conv, pool, BatchNorm;
    None: the model's own): images/s against the model's, and the largest loss difference."""
    runs = [({"part": "train_step", "model": model, "conv": conv_v or "model's", "pool": pool_v or "model's",
              "bn_relu": bn_v}, functools.partial(full_step, model, batch, image, dtype_name, steps, conv_v, pool_v, bn_v))
            for conv_v, pool_v, bn_v in ablations]
    return compare_runs(runs, "model", batch, image, dtype_name)


def compare_runs(runs: Sequence[tuple[dict, Callable[[], dict]]], against: str, batch: int, image: int,
                 dtype_name: str) -> list[dict]:
    """Calls each run (a :func:`full_step` measurement) in order, the first the base: one row
    each, ``what`` plus images/s, ``vs_<against>`` (the ratio to the base), memory, compile
    time and ``max_loss_diff_vs_<against>``, printed as a JSON line. A run that raises is an
    error row and the rest still run; the base raising (nothing to compare with) is raised."""
    rows, base = [], None
    for what, run in runs:
        try:  # a variant that fails on the device is a result: say so, run the rest
            r = run()
        except Exception as e:
            if base is None:
                raise
            print(json.dumps({**what, "error": str(e)[:300]}), flush=True)
            continue
        base = base or r
        row = {**what, "batch_size": batch, "image_size": image, "dtype": dtype_name,
               "device_kind": r["device_kind"], "images_per_second": round(r["images_per_second"], 1),
               f"vs_{against}": round(r["images_per_second"] / base["images_per_second"], 4),
               "peak_memory_gib": r["peak_memory_gib"], "compiled_memory_gib": r["compiled_memory_gib"],
               "compile_seconds": r.get("compile_seconds"),
               f"max_loss_diff_vs_{against}": max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- timing
def timing_parser(doc: str, batch_size: int = 256) -> argparse.ArgumentParser:
    """The argument parser the kernel benchmarks share: ``doc`` (the script's docstring) as its
    help, and ``--batch-size``, ``--dtype``, ``--repeats`` and ``--inner`` (how
    :func:`_median_ms` times each candidate)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported")
    p.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    return p


def _median_ms(fn: Callable[[], object], warmup: int, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls, in ms."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def conv_step(variant: str, dtype) -> Callable:
    """Forward + weight gradient of the stem convolution: (x, float32 kernel, cotangent) -> (y, dkernel)."""
    impl = CONV_VARIANTS[variant]

    def step(x: Array, kernel: Array, cotangent: Array) -> tuple[Array, Array]:
        y, pullback = jax.vjp(lambda k: impl(x, k.astype(dtype)), kernel)
        return y, pullback(cotangent)[0]

    return jax.jit(step)


def pool_step(variant: str, dtype) -> Callable:
    """BatchNorm apply (float32 affine, output in ``dtype``) + max pool + ReLU, forward and
    input gradient, as the stem runs them: (x, scale, bias, cotangent) -> (y, dx)."""
    pool = POOL_VARIANTS[variant]

    def forward(x: Array, scale: Array, bias: Array) -> Array:
        z = (x.astype(jnp.float32) * scale + bias).astype(dtype)
        return jax.nn.relu(pool(z))

    def step(x: Array, scale: Array, bias: Array, cotangent: Array) -> tuple[Array, Array]:
        y, pullback = jax.vjp(lambda x_: forward(x_, scale, bias), x)
        return y, pullback(cotangent)[0]

    return jax.jit(step)


def train_step(variant: str, dtype) -> Callable:
    """The stem's BatchNorm in training + max pool + ReLU, forward and the x, scale and bias
    gradients: (x, scale, bias, cotangent) -> (y, dx, dscale, dbias)."""
    impl = TRAIN_VARIANTS[variant]

    def step(x: Array, scale: Array, bias: Array, cotangent: Array) -> tuple[Array, ...]:
        y, pullback = jax.vjp(lambda *a: impl(*a, dtype), x, scale, bias)
        return (y, *pullback(cotangent))

    return jax.jit(step)


def run(batch: int, image: int, width: int, dtype_name: str, conv_variants: Sequence[str],
        pool_variants: Sequence[str], warmup: int, repeats: int, inner: int) -> list[dict]:
    """Times every candidate; one result dict each (also printed as a JSON line)."""
    dtype = jnp.dtype(dtype_name)
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(keys[0], (batch, image, image, 3), jnp.float32).astype(dtype)
    kernel = jax.random.normal(keys[1], (7, 7, 3, width), jnp.float32) * (2 / (49 * width)) ** 0.5
    conv_h = (image - 1) // 2 + 1
    conv_ct = jax.random.normal(keys[2], (batch, conv_h, conv_h, width), jnp.float32).astype(dtype)
    # The pool's input: a conv output scale; rounding to a coarse grid makes ties (where the
    # first-maximum rule matters) common, as after a ReLU of a low-precision activation.
    pool_x = jnp.round(jax.random.normal(keys[3], (batch, conv_h, conv_h, width)) * 8).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[4], (width,))
    bias = 0.1 * jax.random.normal(keys[5], (width,))
    pool_h = (conv_h + 1) // 2
    pool_ct = jax.random.normal(keys[2], (batch, pool_h, pool_h, width), jnp.float32).astype(dtype)

    results, reference = [], {}
    for part, variants, make, args in (
        ("stem_conv", conv_variants, conv_step, (x, kernel, conv_ct)),
        ("bn_max_pool_relu", pool_variants, pool_step, (pool_x, scale, bias, pool_ct)),
        ("bn_pool_relu_train", list(TRAIN_VARIANTS), train_step, (pool_x, scale, bias, pool_ct)),
    ):
        current = CURRENT[part]
        rows = []
        for variant in variants:
            fn = make(variant, dtype)
            outputs = jax.block_until_ready(fn(*args))
            as_f32 = [np.asarray(o, np.float32) for o in outputs]
            reference.setdefault(part, as_f32)
            # per output (y, then the gradient): max |a - b| over that output's largest |b|
            diff = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
                       for a, b in zip(as_f32, reference[part]))
            rows.append({"part": part, "variant": variant, "batch_size": batch, "image_size": image,
                         "dtype": dtype_name, "device_kind": jax.devices()[0].device_kind,
                         "ms": round(_median_ms(lambda: fn(*args), warmup, repeats, inner), 4),
                         "max_rel_diff_vs_first": diff})
        base = next((r["ms"] for r in rows if r["variant"] == current), None)
        for row in rows:
            row["vs_current"] = round(row["ms"] / base, 3) if base else None
            print(json.dumps(row), flush=True)
        results += rows
    return results


def main(argv: Sequence[str] | None = None) -> None:
    p = timing_parser(__doc__)
    p.add_argument("--image-size", type=int, default=224, help="the image; the pool sees the conv's output")
    p.add_argument("--width", type=int, default=64, help="the stem's output channels (64 for ResNet-50)")
    p.add_argument("--conv", default=",".join(CONV_VARIANTS), help="comma-separated conv candidates")
    p.add_argument("--pool", default=",".join(POOL_VARIANTS), help="comma-separated pool candidates")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--full-step-model", default="resnet50",
                   help="then time this model's whole train step as the model has it, with each of its GPU "
                        "kernel choices undone, and with all of them undone (default resnet50; 'none' skips it)")
    p.add_argument("--full-step-steps", type=int, default=50, help="timed steps of each whole-step run")
    a = p.parse_args(argv)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    unknown = sorted(set(split(a.conv)) - set(CONV_VARIANTS)) + sorted(set(split(a.pool)) - set(POOL_VARIANTS))
    if unknown:
        p.error(f"unknown candidates {unknown}; conv: {sorted(CONV_VARIANTS)}, pool: {sorted(POOL_VARIANTS)}")
    rows = run(a.batch_size, a.image_size, a.width, a.dtype, split(a.conv), split(a.pool),
               a.warmup, a.repeats, a.inner)
    print(f"\nstem candidates, batch {a.batch_size} @{a.image_size}px {a.dtype} on {jax.devices()[0].device_kind}"
          " (forward + backward, median ms; ratio to what the step runs now; largest |diff| to the first listed, relative to its largest value)")
    for r in rows:
        ratio = f"{r['vs_current']:.2f}x" if r["vs_current"] is not None else "-"
        print(f"  {r['part']:<17}{r['variant']:<8}{r['ms']:>9.3f} ms {ratio:>7}  diff {r['max_rel_diff_vs_first']:.3g}")
    if a.full_step_model != "none":
        steps = full_steps(a.full_step_model, a.batch_size, a.image_size, a.dtype, a.full_step_steps)
        print(f"\nwhole {a.full_step_model} train step, batch {a.batch_size} @{a.image_size}px {a.dtype}:")
        for r in steps:
            print(f"  conv {r['conv']:<8} pool {r['pool']:<8} bn {r['bn_relu']:<6}{r['images_per_second']:>10.1f} images/s "
                  f"{r['vs_model']:>7.3f}x  peak {r['peak_memory_gib'] or 0:.2f} GiB  "
                  f"max loss diff {r['max_loss_diff_vs_model']:.2g}")


if __name__ == "__main__":
    main()
