"""Candidate kernels for the ResNet stem, timed in isolation on the device: the next change to make.

The H200 profile of the ResNet-50 step (docs/performance.md, "Our figures") puts 4.9 ms of
its 36.4 ms in the stem, ~3.4 ms more than its bytes need:

- the 7x7/2 convolution over 3 input channels (1.75 ms forward, 1.11 ms weight gradient:
  17 TFLOP/s, a reduction of 147 that fits no tensor-core tile);
- BatchNorm apply + the 3x3/2 max pool (0.68 ms forward, 1.40 ms backward at 0.4-0.8 TB/s:
  change 3's strided slices make these kernels instruction-bound).

This script times each part's candidates, forward and backward together, at the step's
shapes, and checks each against the current version on the same inputs:

stem convolution (forward + weight gradient; the image needs no gradient):
  ``direct``          the model's ``nn.Conv``: 7x7/2 over 3 channels (what the step runs now)
  ``pad4``, ``pad8``  input and kernel zero-padded to 4 or 8 channels (NVIDIA's MLPerf stem
                      pads to 4 for cuDNN's first-layer kernels)
  ``s2d``, ``s2d16``  space to depth (MLPerf's TPU stem): each 2x2 block of pixels folded into
                      the channels, a 4x4 stride-1 convolution over 12 channels (or 16,
                      zero-padded) with the kernel rearranged to match: the same sums

BatchNorm apply + max pool 3x3/2 + ReLU (forward + input gradient):
  ``xla``             ``nn.max_pool``: reduce-window, select-and-scatter backward (the flax peer)
  ``slices``          ``layers.max_pool_fused_gradient``, change 3 (what the step runs now)
  ``parity``          :func:`max_pool_parity`: the same derivative, with the input viewed as
                      2x2 parity planes, so every window tap is a stride-1 shifted slice and
                      the backward pass sums at most four taps per input element

Every candidate computes the same function: the convolutions agree to float32 rounding, and
the pools agree exactly (max is exact, and all three route the gradient to the first maximum
of the window in row-major order). The tests check this on CPU. On the device, one line per
candidate: ``{"part", "variant", "ms", "vs_current", "max_rel_diff_vs_first"}``, then a table.

Then the whole train step (``resnet-jax benchmark``'s measurement, ResNet-50 by default) as
the model has it, with the parity pool, with the fastest convolution candidate, with both,
with ``bn_relu_pallas.py``'s BatchNorm + ReLU alone, with it and its statistics kernel, and
with those on top of both, patched into the model for that run only (:func:`full_step`):
what a candidate gains where it counts, and the largest difference of the loss over the run
against the model's own.
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet_jax.models.layers import _max_pool, max_pool_fused_gradient  # noqa: E402

Array = jax.Array
_NHWC = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------- stem convolution candidates
def conv_direct(x: Array, kernel: Array) -> Array:
    """7x7/2 convolution, padding 3 (the model's stem ``conv1``): NHWC ``x``, HWIO ``kernel``."""
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=_NHWC)


def conv_pad_channels(x: Array, kernel: Array, channels: int) -> Array:
    """:func:`conv_direct` with the input channels zero-padded to ``channels`` (kernel likewise)."""
    extra = channels - x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return conv_direct(x, kernel)


def conv_space_to_depth(x: Array, kernel: Array, channels: int | None = None) -> Array:
    """:func:`conv_direct` as a 4x4 stride-1 convolution over 2x2 pixel blocks folded into channels.

    With ``xp`` the input padded by 3 in front, output ``o`` is ``sum_k xp[2o + k] w[k]`` for
    k = 0..6 per spatial axis. Writing k = 2q + p (p = 0, 1; w[7] = 0) and ``X[b, p] =
    xp[2b + p]`` gives ``sum_q X[o + q] . W[q]``: a valid 4-tap convolution over blocks with
    2 x 2 x C channels. ``channels`` zero-pads those (12 for RGB) further, e.g. to 16.
    """
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    if (kh, kw) != (7, 7):
        raise ValueError(f"conv_space_to_depth is written for the 7x7/2 stem, got a {kh}x{kw} kernel")
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # as conv_direct: (h + 6 - 7) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (3, 2 * (ho + 3) - h - 3), (3, 2 * (wo + 3) - w - 3), (0, 0)))
    blocks = xp.reshape(n, ho + 3, 2, wo + 3, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, ho + 3, wo + 3, 4 * c)
    kp = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    k_blocks = kp.reshape(4, 2, 4, 2, c, features).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, features)
    if channels is not None and channels > 4 * c:
        blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, 0), (0, channels - 4 * c)))
        k_blocks = jnp.pad(k_blocks, ((0, 0), (0, 0), (0, channels - 4 * c), (0, 0)))
    return jax.lax.conv_general_dilated(blocks, k_blocks, (1, 1), "VALID", dimension_numbers=_NHWC)


CONV_VARIANTS: dict[str, Callable[[Array, Array], Array]] = {
    "direct": conv_direct,
    "pad4": functools.partial(conv_pad_channels, channels=4),
    "pad8": functools.partial(conv_pad_channels, channels=8),
    "s2d": conv_space_to_depth,
    "s2d16": functools.partial(conv_space_to_depth, channels=16),
}


# ---------------------------------------------------------------- max pool candidates
# Window tap d (0, 1, 2) of output o reads input 2o - 1 + d: block o - 1 parity 1, block o
# parity 0, block o parity 1. (shift in blocks, parity) per tap:
_TAPS = ((1, 1), (0, 0), (0, 1))


def _window_taps(x: Array, fill: float) -> list[Array]:
    """The nine taps of the 3x3/2 windows (padding 1) of NHWC ``x``, row-major, each (N, Ho, Wo, C).

    ``x`` is padded with ``fill`` to even H and W and viewed as (N, Ho, 2, Wo, 2, C) parity
    planes (a reshape, no copy): each tap is then a parity plane shifted by 0 or 1 block,
    with ``fill`` shifted in, where a strided slice would need index arithmetic per element.
    """
    n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    fill_value = jnp.array(fill, x.dtype)
    x = jax.lax.pad(x, fill_value, ((0, 0, 0), (0, h % 2, 0), (0, w % 2, 0), (0, 0, 0)))
    planes = x.reshape(n, ho, 2, wo, 2, c)
    taps = []
    for row_shift, row_parity in _TAPS:
        for col_shift, col_parity in _TAPS:
            # each tap from the planes directly, not through a shared row slice: the backward
            # pass then adds the windows' contributions to an input element in the order of
            # XLA's select-and-scatter (window by window), so the gradients are equal bit for bit
            tap = planes[:, :, row_parity, :, col_parity]  # (N, Ho, Wo, C)
            if row_shift or col_shift:
                tap = jax.lax.pad(tap, fill_value, ((0, 0, 0), (row_shift, -row_shift, 0),
                                                    (col_shift, -col_shift, 0), (0, 0, 0)))
            taps.append(tap)
    return taps


@jax.custom_jvp
def max_pool_parity(x: Array) -> Array:
    """3x3/2 max pool, padding 1, of NHWC ``x``: ``nn.max_pool``'s values and derivative.

    The derivative goes to the first maximum of each window in row-major order, as
    ``nn.max_pool``'s and ``layers.max_pool_fused_gradient``'s; the windows are read as
    shifted parity planes (:func:`_window_taps`) instead of strided slices.
    """
    return functools.reduce(jnp.maximum, _window_taps(x, -jnp.inf))


@max_pool_parity.defjvp
def _max_pool_parity_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    taps = _window_taps(x, -jnp.inf)
    y = functools.reduce(jnp.maximum, taps)
    first_max = jnp.full(y.shape, 9, jnp.int8)
    for k in reversed(range(9)):  # the lowest k that equals the maximum wins
        first_max = jnp.where(taps[k] == y, jnp.int8(k), first_max)
    t_out = jnp.zeros(y.shape, t.dtype)
    for k, tap in enumerate(_window_taps(t, 0.0)):
        t_out = t_out + jnp.where(first_max == k, tap, jnp.zeros_like(tap))
    return y, t_out


POOL_VARIANTS: dict[str, Callable[[Array], Array]] = {
    "xla": _max_pool,
    "slices": max_pool_fused_gradient,
    "parity": max_pool_parity,
}


# ---------------------------------------------------------------- in the whole train step
def as_lax_conv(impl: Callable[[Array, Array], Array]) -> Callable[..., Array]:
    """``impl`` (one of :data:`CONV_VARIANTS`) with ``lax.conv_general_dilated``'s signature, as
    ``nn.Conv(conv_general_dilated=...)`` calls it; refuses any convolution but the 7x7/2 stem's."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, precision=None):
        stem = (tuple(window_strides) == (2, 2) and [tuple(p) for p in padding] == [(3, 3), (3, 3)]
                and rhs.shape[:2] == (7, 7) and feature_group_count == 1
                and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation)))
        if not stem:
            raise ValueError(f"{impl} replaces the 7x7/2 stem convolution (padding 3) only")
        return impl(lhs, rhs)

    return conv_general_dilated


def full_step(model: str, batch: int, image: int, dtype_name: str, steps: int,
              conv_variant: str = "direct", pool_variant: str | None = None, bn_relu: str = "model") -> dict:
    """``resnet-jax benchmark``'s measurement of the whole train step of ``model``, with the
    stem's 7x7/2 convolution computed by ``conv_variant``, its max pool by ``pool_variant``
    (None: the model's own) and, with ``bn_relu="pallas"`` or ``"pallas-stats"``, the
    BatchNorm candidates of ``bn_relu_pallas.py``, patched in for this call only."""
    from benchmarks import bn_relu_pallas
    from resnet_jax.models import layers, resnet
    from resnet_jax.train.benchmark import benchmark_config, measure

    batch_norm = bn_relu_pallas.batch_norm_relu(bn_relu)
    model_conv, model_pool = resnet.conv, layers.max_pool_3x3_s2
    stem_conv = as_lax_conv(CONV_VARIANTS[conv_variant])

    def conv(features: int, kernel_size: int = 3, strides: int = 1, *args, **kwargs) -> nn.Conv:
        if kernel_size == 7 and strides == 2 and conv_variant != "direct":
            kwargs["conv_general_dilated"] = stem_conv
        return model_conv(features, kernel_size, strides, *args, **kwargs)

    try:
        resnet.conv = conv
        if pool_variant:
            layers.max_pool_3x3_s2 = POOL_VARIANTS[pool_variant]
        with batch_norm:
            return measure(benchmark_config(model, batch, image, dtype_name), steps=steps)
    finally:
        resnet.conv, layers.max_pool_3x3_s2 = model_conv, model_pool


def full_steps(model: str, batch: int, image: int, dtype_name: str, steps: int, conv_variant: str,
               pool_variant: str, bn_relu: bool = True) -> list[dict]:
    """The whole step as the model has it, with ``pool_variant``, with ``conv_variant``, with
    both, and (``bn_relu``) with the Pallas BatchNorm + ReLU alone, with it and the Pallas
    statistics, and with those on top of both: images/s, against the model's own, and the
    largest loss difference over the run."""
    rows, base = [], None
    combinations = [("direct", None, "model"), ("direct", pool_variant, "model"), (conv_variant, None, "model"),
                    (conv_variant, pool_variant, "model")]
    if bn_relu:
        combinations += [("direct", None, "pallas"), ("direct", None, "pallas-stats"),
                         (conv_variant, pool_variant, "pallas-stats")]
    for conv_v, pool_v, bn_v in dict.fromkeys(combinations):  # in order, without repeats
        what = {"part": "train_step", "model": model, "conv": conv_v, "pool": pool_v or "model's", "bn_relu": bn_v}
        try:  # a candidate that fails on the device is a result: say so, run the rest
            r = full_step(model, batch, image, dtype_name, steps, conv_v, pool_v, bn_v)
        except Exception as e:
            if base is None:  # the model's own step failed: nothing to compare against
                raise
            print(json.dumps({**what, "error": str(e)[:300]}), flush=True)
            continue
        base = base or r
        row = {**what, "batch_size": batch, "image_size": image, "dtype": dtype_name,
               "device_kind": r["device_kind"], "images_per_second": round(r["images_per_second"], 1),
               "vs_model": round(r["images_per_second"] / base["images_per_second"], 4),
               "peak_memory_gib": r["peak_memory_gib"], "compiled_memory_gib": r["compiled_memory_gib"],
               "max_loss_diff_vs_model": max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- timing
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
    ):
        current = "direct" if part == "stem_conv" else "slices"
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224, help="the image; the pool sees the conv's output")
    p.add_argument("--width", type=int, default=64, help="the stem's output channels (64 for ResNet-50)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--conv", default=",".join(CONV_VARIANTS), help="comma-separated conv candidates")
    p.add_argument("--pool", default=",".join(POOL_VARIANTS), help="comma-separated pool candidates")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--full-step-model", default="resnet50",
                   help="then time this model's whole train step with the fastest conv candidate, the parity "
                        "pool, both, and the --bn-relu runs, against the model's own (default resnet50; 'none' "
                        "skips it)")
    p.add_argument("--full-step-steps", type=int, default=50, help="timed steps of each whole-step run")
    p.add_argument("--bn-relu", choices=("pallas", "none"), default="pallas",
                   help="also time the whole step with bn_relu_pallas.py's BatchNorm + ReLU, with it and its "
                        "statistics kernel, and with those and both stem candidates ('none' skips those three runs)")
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
        convs = [r for r in rows if r["part"] == "stem_conv" and r["variant"] != "direct"]
        best_conv = min(convs, key=lambda r: r["ms"])["variant"] if convs else "direct"
        steps = full_steps(a.full_step_model, a.batch_size, a.image_size, a.dtype, a.full_step_steps,
                           best_conv, "parity", bn_relu=a.bn_relu == "pallas")
        print(f"\nwhole {a.full_step_model} train step, batch {a.batch_size} @{a.image_size}px {a.dtype}:")
        for r in steps:
            print(f"  conv {r['conv']:<7} pool {r['pool']:<9} bn {r['bn_relu']:<13}{r['images_per_second']:>10.1f} images/s "
                  f"{r['vs_model']:>7.3f}x  peak {r['peak_memory_gib'] or 0:.2f} GiB  "
                  f"max loss diff {r['max_loss_diff_vs_model']:.2g}")


if __name__ == "__main__":
    main()
