"""``resnet-jax benchmark``: the trainer's own train step on synthetic data already on the device.

Reports compile time, images/s (median over timed windows after warm-up, with min
and max), step time, achieved model TFLOP/s and MFU against the device's peak
(3 x 2 x multiply-adds per image: forward plus two backward products), peak device
memory, and optionally the largest batch that fits. ``--with-input`` feeds the same
step from the real tf.data pipeline instead, to show whether input is the bottleneck.
``--config FILE.py[:variant]`` takes the step's training options from a recipe.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# With --profile DIR: the compiled step's optimised HLO, beside the trace (benchmarks/kernel_bandwidth.py).
PROFILE_HLO_FILE = "train_step.hlo.txt"
# Dense bf16 peak TFLOP/s by device kind (vendor datasheets), for MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def device_peak_tflops(device: Any) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def benchmark_config(
    model: str, batch_size: int, image_size: int, dtype: str, num_classes: int = 1000, recipe: Any = None
) -> Any:
    """The trainer's config for a synthetic-data benchmark of ``model``.

    ``recipe`` (a config from :func:`resnet_jax.train.config.load_recipe`): its training
    options are kept (EMA, label smoothing, weight decay and its exclusions, BatchNorm
    groups, model options such as dropout and stochastic depth), and only the data becomes
    ``fake`` images of ``image_size`` on the device, with ``model``, ``dtype`` and
    ``batch_size`` set. Without one: the defaults of :func:`base_config` with SGD+Nesterov
    and a cosine schedule.
    """
    from resnet_jax.train.config import base_config

    if recipe is None:
        c = base_config()
        c.optimizer.nesterov = True
        c.schedule.name = "cosine"
    else:
        c = recipe.copy_and_resolve_references()
        num_classes = c.model.num_classes or num_classes
    c.model.name = model
    c.model.dtype = dtype
    c.data.name = "fake"
    c.data.dtype = dtype
    c.data.image_size = image_size
    c.data.num_classes = num_classes
    c.data.batch_size = c.data.eval_batch_size = batch_size
    c.data.fake_train_size = batch_size * 1000
    c.data.fake_pool_batches = 1
    c.num_train_steps = 10**6
    c.stop_after_steps = None
    c.compilation_cache_dir = ""
    return c


def compiled_peak_bytes(compiled: Any) -> int | None:
    """XLA's buffer assignment for a compiled program: arguments + temporaries + outputs not
    aliased to (donated) arguments, in bytes; the program's peak before allocator rounding.
    None where the backend gives no memory analysis."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (
        mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    )


def _peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def measure(
    config: Any, steps: int = 50, windows: int = 5, warmup: int = 5, with_input: bool = False,
    profile_dir: str | None = None, steps_per_dispatch: int = 1, max_compiled_bytes: int | None = None,
) -> dict:
    """Compiles and times ``config``'s train step; returns the figures as a dict.

    ``losses`` holds the loss of every step run (warm-up included), read from the
    device only at the end, so a faster variant's loss curve can be compared with the
    baseline's on the same seed. ``profile_dir``: a ``jax.profiler`` trace of the last
    timed window, and the compiled step's optimised HLO (``train_step.hlo.txt``) for
    ``benchmarks/kernel_bandwidth.py``. ``steps_per_dispatch`` = k > 1 runs k steps per
    call (``step.compile_multi_step``); warm-up and each window are then rounded up to
    whole calls, and ``steps`` in the result says how many steps were timed.
    ``max_compiled_bytes``: raise :class:`DoesNotFit` instead of running a step whose
    compiled buffer assignment needs more.
    """
    from resnet_jax.data.pipeline import to_global_batches
    from resnet_jax.models import model_macs
    from resnet_jax.train import sharding
    from resnet_jax.train.loop import create_state, setup
    from resnet_jax.train.step import compile_multi_step

    if steps_per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}")
    k = steps_per_dispatch
    s = setup(config)
    state = create_state(s)
    batches = to_global_batches(s.pipeline.train_batches(0), sharding.batch_sharding(s.mesh), config.data.prefetch)
    step_fn, stacked = s.train_step, sharding.stacked_batch_sharding(s.mesh)
    if k > 1:
        step_fn = compile_multi_step(s.train_step, s.state_sharding, stacked, sharding.replicated(s.mesh))

    def call_input(step_batches: list) -> Any:
        """One call's input: the batch, or k batches stacked (with --with-input, stacking is timed)."""
        if k == 1:
            return step_batches[0]
        return jax.tree_util.tree_map(lambda *xs: jax.device_put(jax.numpy.stack(xs), stacked), *step_batches)

    def next_input() -> Any:
        return call_input([next(batches) for _ in range(k)])

    first = next(batches)
    batch = call_input([first] * k)  # without --with-input every step trains on this one batch
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    needed = compiled_peak_bytes(compiled)
    if max_compiled_bytes is not None and needed is not None and needed > max_compiled_bytes:
        raise DoesNotFit(
            f"the compiled step needs {needed / 2**30:.2f} GiB, more than the "
            f"{max_compiled_bytes / 2**30:.2f} GiB XLA may allocate"
        )
    if profile_dir is not None:
        # The optimised HLO beside the trace: benchmarks/kernel_bandwidth.py joins the two.
        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, PROFILE_HLO_FILE), "w") as f:
            f.write(compiled.as_text())
    losses = []  # device arrays; reading them per step would put the host on the critical path
    for _ in range(-(-warmup // k)):
        state, metrics = compiled(state, batch if not with_input else next_input())
        losses.append(metrics["loss"])
    jax.block_until_ready(metrics)
    calls_per_window = -(-max(1, steps // windows) // k)
    per_window = calls_per_window * k
    rates = []
    for window in range(windows):
        tracing = profile_dir is not None and window == windows - 1
        if tracing:
            jax.profiler.start_trace(profile_dir)
        start = time.perf_counter()
        for _ in range(calls_per_window):
            state, metrics = compiled(state, batch if not with_input else next_input())
            losses.append(metrics["loss"])
        jax.block_until_ready((state.step, metrics))
        rates.append(per_window * config.data.batch_size / (time.perf_counter() - start))
        if tracing:
            jax.profiler.stop_trace()
    median = statistics.median(rates)
    macs = model_macs(s.model, config.data.image_size)
    tflops = 6 * macs * median / 1e12
    peak = device_peak_tflops(jax.devices()[0])
    return {
        "model": config.model.name,
        "batch_size": config.data.batch_size,
        "image_size": config.data.image_size,
        "dtype": config.model.dtype,
        "devices": s.mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "with_input": with_input,
        "dataset": config.data.name,
        "steps_per_dispatch": k,
        "steps": per_window * windows,
        "compile_seconds": compile_seconds,
        "images_per_second": median,
        "images_per_second_min": min(rates),
        "images_per_second_max": max(rates),
        "step_ms": 1000 * config.data.batch_size / median,
        "model_tflops": tflops,
        "mfu": tflops / (peak * s.mesh.size) if peak else None,
        "peak_memory_gib": (_peak_memory_bytes() or 0) / 2**30 or None,
        "compiled_memory_gib": (needed or 0) / 2**30 or None,
        "final_loss": float(np.ravel(metrics["loss"])[-1]),
        "losses": [round(float(x), 5) for x in np.concatenate([np.ravel(x) for x in jax.device_get(losses)])],
    }


class DoesNotFit(Exception):
    """The compiled step needs more device memory than the device lets XLA allocate."""


def device_memory_limit_bytes() -> int | None:
    """The bytes XLA may allocate on the first local device (``bytes_limit`` of its memory
    stats: on a GPU, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of it, 75% by default), or None
    where the backend reports no limit (the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def _required_memory_limit_bytes() -> int:
    limit_bytes = device_memory_limit_bytes()
    if limit_bytes is None:
        raise ValueError(
            "--find-max-batch needs a device that reports its memory limit (a GPU or TPU); this "
            f"{jax.devices()[0].platform} backend reports none, and running out of host memory would "
            "kill the process instead of failing one probe. Leave the flag out here, or run on the accelerator."
        )
    return limit_bytes


def largest_fitting(
    fits: Callable[[int], bool], start: int, limit: int, granularity: int = 8, tolerance: float = 1 / 16,
    guess: Callable[[], int | None] | None = None,
) -> tuple[int, int | None]:
    """Searches the largest batch for which ``fits(batch)`` holds, assuming it is monotone.

    Doubles from ``start`` (at most to ``limit``) until a batch fails, then bisects between
    the last batch that fitted and the first that failed, in multiples of ``granularity``,
    until the two are at most ``max(granularity, tolerance * fitted)`` apart. Returns
    ``(fitted, failed)``: the largest batch seen to fit (0 if none did) and the smallest
    seen to fail (None if ``limit`` itself fits, so the search stopped there).

    ``guess()``, if given, predicts the largest batch that fits from what the probes so
    far have shown (:func:`find_max_batch` extrapolates compiled memory, which grows
    linearly with the batch). After a batch fits, the search probes the guess instead of
    doubling, or, where the guess is not above that batch, one step of the final precision
    further; after a failure it probes one step below the failed batch before bisecting.
    With a good guess that is four probes in all instead of eight or more (ResNet-50 on an
    H200, in a closed-form test), which matters on a GPU, where every probe compiles with
    autotuning (up to a minute at large batches).
    """
    if start < 1 or start > limit or granularity < 1:
        raise ValueError(f"need 1 <= start <= limit and granularity >= 1, got {start}, {limit}, {granularity}")

    def done(fitted: int, failed: int) -> bool:
        return failed - fitted <= max(granularity, int(tolerance * fitted))

    def step(batch: int) -> int:  # the precision the search ends at, in whole granules
        return max(granularity, int(tolerance * batch) // granularity * granularity)

    fitted, failed, batch = 0, None, start
    while failed is None:
        if not fits(batch):
            failed = batch
        elif batch >= limit:
            return batch, None
        else:
            fitted, batch = batch, min(2 * batch, limit)
            predicted = guess() if guess else None
            if predicted is not None:
                predicted = predicted // granularity * granularity
                batch = min(predicted if predicted > fitted else fitted + step(fitted), limit)
    if guess and fitted and not done(fitted, failed):
        below = (failed - step(failed)) // granularity * granularity
        if fitted < below < failed:
            fitted, failed = (below, failed) if fits(below) else (fitted, below)
    while not done(fitted, failed):
        middle = (fitted + failed) // 2 // granularity * granularity
        if not fitted < middle < failed:
            break
        fitted, failed = (middle, failed) if fits(middle) else (fitted, middle)
    return fitted, failed


# Share of the device's limit kept free when extrapolating compiled memory to a larger batch:
# the allocator needs a little more than XLA's buffer assignment (on the H200, ResNet-50 at
# batch 256: 10.17 GiB in use at peak against 10.03 GiB assigned).
GUESS_MARGIN = 0.02


def linear_memory_guess(fitted_bytes: dict[int, float], limit_bytes: float, margin: float = GUESS_MARGIN) -> int | None:
    """The largest batch whose compiled memory stays within ``(1 - margin) * limit_bytes``,
    on the line through the two largest batches of ``fitted_bytes`` (batch -> compiled bytes
    of a step that fitted), or through the origin and the only one. None without a point."""
    points = sorted(fitted_bytes.items())[-2:]
    if not points:
        return None
    (b1, m1) = points[-1]
    per_image, fixed = m1 / b1, 0.0
    if len(points) == 2 and m1 > points[0][1]:
        (b0, m0) = points[0]
        per_image = (m1 - m0) / (b1 - b0)
        fixed = m1 - per_image * b1
    return int(((1 - margin) * limit_bytes - fixed) / per_image)


def find_max_batch(
    model: str, image_size: int, dtype: str, start: int = 64, limit: int = 8192,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True), recipe: Any = None,
    measured: dict[int, float] | None = None,
) -> dict:
    """The largest batch whose train step fits the device's memory, searched by
    :func:`largest_fitting` from ``start``, guided by :func:`linear_memory_guess`.

    Each probe compiles the step for that batch. If XLA's buffer assignment already
    exceeds what the device lets XLA allocate (:func:`device_memory_limit_bytes`) it does
    not fit and is not run; otherwise it runs one step, and fails only if that runs out of
    memory. ``measured``: batch -> compiled bytes of steps already run (the benchmark's own
    batch), taken as fitting without a probe. ``log`` gets one line per probe (default:
    standard error). ``recipe``: as :func:`benchmark_config`. Returns
    ``max_batch`` (0 if not even ``start`` fits on the way down), ``max_batch_fails`` (the
    smallest batch seen not to fit, None if the search stopped at ``limit``),
    ``memory_limit_gib`` and ``max_batch_probes`` (the batches compiled). Raises
    ``ValueError`` on a backend that reports no memory limit (the CPU: there the limit is
    host RAM, and running out kills the process instead of raising).
    """
    limit_bytes = _required_memory_limit_bytes()
    granularity = math.lcm(8, jax.device_count())  # the batch must split evenly across devices
    fitted_bytes = dict(measured or {})
    probes: list[int] = []

    def fits(batch: int) -> bool:
        if batch in fitted_bytes:
            log(f"  batch {batch:>6}: fits ({fitted_bytes[batch] / 2**30:.2f} GiB compiled, measured above)")
            return True
        probes.append(batch)
        t0 = time.perf_counter()
        try:
            r = measure(benchmark_config(model, batch, image_size, dtype, recipe=recipe), steps=1, windows=1,
                        warmup=1, max_compiled_bytes=limit_bytes)
        except DoesNotFit as e:
            log(f"  batch {batch:>6}: does not fit ({e})")
            return False
        except Exception as e:  # XLA raises RESOURCE_EXHAUSTED as XlaRuntimeError / JaxRuntimeError
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                log(f"  batch {batch:>6}: does not fit (out of memory when run)")
                return False
            raise
        if r["compiled_memory_gib"]:
            fitted_bytes[batch] = r["compiled_memory_gib"] * 2**30
        log(f"  batch {batch:>6}: fits ({r['compiled_memory_gib']:.2f} GiB compiled, "
            f"{time.perf_counter() - t0:.0f} s)")
        return True

    log(f"largest batch of {model} @{image_size}px {dtype}: XLA may allocate {limit_bytes / 2**30:.2f} GiB")
    fitted, failed = largest_fitting(fits, min(start, limit) // granularity * granularity or granularity,
                                     limit, granularity, guess=lambda: linear_memory_guess(fitted_bytes, limit_bytes))
    return {"max_batch": fitted, "max_batch_fails": failed, "memory_limit_gib": limit_bytes / 2**30,
            "max_batch_probes": probes}


def main(args: Any) -> int:
    if args.find_max_batch:  # refused before the long part, not after it
        try:
            _required_memory_limit_bytes()
        except ValueError as e:
            raise SystemExit(f"resnet-jax benchmark: {e}") from None
    recipe = None
    if args.config:
        from resnet_jax.train.config import load_recipe

        try:
            recipe = load_recipe(args.config)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"resnet-jax benchmark: --config {args.config}: {e}") from None
    # flags win; then the recipe's model, image size and dtype; then ResNet-50 at 224px in bfloat16
    model = args.model or (recipe.model.name if recipe else "resnet50")
    image_size = args.image_size or (recipe.data.image_size if recipe else 224)
    dtype = args.dtype or (recipe.model.dtype if recipe else "bfloat16")
    config = benchmark_config(model, args.batch_size, image_size, dtype, recipe=recipe)
    if args.with_input:  # the recipe's dataset and preprocessing (RandAugment included), else ImageNet's
        config.data.name = args.dataset or (recipe.data.name if recipe else "imagenet2012")
        if args.data_dir:  # else the recipe's (benchmark_config kept it) or tfds's default
            config.data.data_dir = args.data_dir
        if recipe is None:
            config.data.preprocess = "imagenet"
    result = measure(
        config, steps=args.steps, with_input=args.with_input, profile_dir=args.profile,
        steps_per_dispatch=args.steps_per_dispatch,
    )
    result["config"] = args.config
    if args.find_max_batch:  # the measured batch fits: the search starts there, without running it again
        measured = {args.batch_size: result["compiled_memory_gib"] * 2**30} if result["compiled_memory_gib"] else {}
        result.update(find_max_batch(model, image_size, dtype, start=args.batch_size, recipe=recipe,
                                     measured=measured))
    if args.json:
        print(json.dumps(result))
    else:
        mem = f"{result['peak_memory_gib']:.2f} GiB (allocator)" if result["peak_memory_gib"] else "n/a (allocator)"
        if result["compiled_memory_gib"]:
            mem += f", {result['compiled_memory_gib']:.2f} GiB the compiled step (XLA's buffer assignment)"
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a (unknown peak)"
        largest = ""
        if "max_batch" in result:
            largest = f"\n  largest batch      {result['max_batch']}" + (
                f" ({result['max_batch_fails']} does not fit" if result["max_batch_fails"]
                else " (the search stops there"
            ) + f"; XLA may allocate {result['memory_limit_gib']:.1f} GiB)"
        print(
            f"{result['model']} batch {result['batch_size']} @{result['image_size']}px {result['dtype']} on "
            f"{result['devices']}x {result['device_kind']} (jax {result['jax']})"
            + (f", recipe {result['config']}" if result["config"] else "")
            + (f", fed from {result['dataset']} by tf.data" if result["with_input"] else "")
            + (f", {result['steps_per_dispatch']} steps per dispatch" if result["steps_per_dispatch"] > 1 else "")
            + "\n"
            f"  compile            {result['compile_seconds']:.1f} s\n"
            f"  images/s           {result['images_per_second']:.1f} (min {result['images_per_second_min']:.1f}, "
            f"max {result['images_per_second_max']:.1f})\n"
            f"  step time          {result['step_ms']:.2f} ms\n"
            f"  model TFLOP/s      {result['model_tflops']:.2f}   MFU {mfu}\n"
            f"  peak memory        {mem}"
            + largest
        )
    return 0 if np.isfinite(result["final_loss"]) else 1
