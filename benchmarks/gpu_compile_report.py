"""Compile the trainer's train step for an NVIDIA GPU (or a TPU) without one; report what XLA built.

    python3 -m pip install "jax[cuda12-local]"     # the CUDA plugin, no CUDA libraries (test extra; cuda13-local also works)
    python3 benchmarks/gpu_compile_report.py --model resnet50 --batch-size 256 [--top 15] [--json]
    python3 benchmarks/gpu_compile_report.py --gpus 2 --batch-size 512 --bn-relu pallas   # 2 GPUs, a candidate
    python3 -m pip install "jax[tpu]"              # libtpu, for --tpu
    python3 benchmarks/gpu_compile_report.py --tpu v5e:2x2      # one chip of that topology

The CUDA plugin compiles for the target described by ``--target`` (a GpuTargetConfigProto,
default ``benchmarks/gpu_specs/h100_sxm.txtpb``) on any Linux x86 machine: no GPU, driver
or CUDA toolkit is needed. On a machine with a GPU attached the attached one is used.
``--tpu TOPOLOGY`` compiles for one chip of a TPU topology with libtpu instead.
Reported, for the same ``train_step`` that ``resnet-jax train`` runs:

- compile seconds (host side; without the device XLA skips autotuning, so a real
  compile takes longer and may pick other convolution algorithms);
- device memory from XLA's buffer assignment: arguments, temporaries (activations kept
  for the backward pass, workspaces), outputs; their sum is the step's peak, before the
  allocator's rounding;
- HBM traffic per step (``hlo_traffic``) and the two floors it implies: the step cannot
  run faster than traffic / bandwidth, nor than model FLOPs / peak FLOP/s;
- with ``--top N`` the N kernels that move the most bytes, to find what to fuse next;
- with ``--max-batch-within GIB`` the largest batch whose step needs at most GIB (one
  compile per probe): the prediction of ``resnet-jax benchmark --find-max-batch``;
- with ``--gpus N`` the step with its batch split over N GPUs (per-GPU figures), and with
  ``--bn-relu xla`` the step with XLA's BatchNorm reductions in place of the model's Pallas
  kernels (``pallas``: the backward kernel alone; ``bn_relu_pallas.batch_norm``).

Used in docs/performance.md to predict a change's effect before it is timed on a device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not os.path.exists("/dev/nvidia0"):
    # No GPU here: keep jax on the CPU backend so the CUDA plugin only compiles (it would
    # otherwise fail to initialise without the CUDA runtime).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.hlo_traffic import entry_kernels, summarise  # noqa: E402

DEFAULT_TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs", "h100_sxm.txtpb")
# TPU generation -> HBM bytes/s per chip, from Google's TPU pages (a GPU's is in its target
# file). Peak FLOP/s come from resnet_jax.train.benchmark.PEAK_TFLOPS, as for MFU.
TPU_BANDWIDTH = {"v4": 1.2e12, "v5e": 8.19e11, "v5p": 2.765e12, "v6e": 1.64e12}


def target_devices(target: str, tpu: str | None = None, gpus: int = 1) -> list:
    """The attached GPU, or one compile-only device: of the GPU that ``target`` describes,
    or of the TPU topology ``tpu`` (e.g. ``v5e:2x2``). ``gpus`` > 1: that many GPUs (attached,
    or of one compile-only host: topology ``1x1xN``)."""
    from jax.experimental import topologies

    if tpu:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server
        try:
            return list(topologies.get_topology_desc(tpu, platform="tpu").devices)[:1]
        except (KeyError, RuntimeError, ValueError) as e:
            raise SystemExit(
                f"gpu_compile_report: cannot compile for TPU {tpu} here ({e}).\n"
                'Install libtpu for this jax (no TPU needed): python3 -m pip install "jax[tpu]"'
            ) from e
    try:
        attached = jax.devices("gpu")
    except RuntimeError:
        attached = []
    if attached:
        if len(attached) < gpus:
            raise SystemExit(f"gpu_compile_report: {gpus} GPUs asked for, {len(attached)} attached")
        return attached[:gpus]
    try:
        with open(target) as f:
            config = f.read()
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{gpus}", target_config=config)
    except (KeyError, RuntimeError, ValueError) as e:  # no CUDA plugin registered, or a bad spec
        raise SystemExit(
            f"gpu_compile_report: cannot compile for a CUDA target here ({e}).\n"
            'Install the CUDA plugin matching jax (no GPU needed): python3 -m pip install "jax[cuda12-local]"'
        ) from e
    return list(topology.devices)[:gpus]


def gpu_spec(device_kind: str) -> str | None:
    """The ``gpu_specs/`` target file of a device kind ("NVIDIA H200" -> h200_sxm.txtpb), if there is one."""
    for name in ("H200", "H100"):
        if name in device_kind:
            return os.path.join(os.path.dirname(DEFAULT_TARGET), f"{name.lower()}_sxm.txtpb")
    return None


def bandwidth_bytes_per_second(target: str) -> float:
    """Peak HBM bytes/s of a GPU target file (``gpu_device_info.memory_bandwidth``)."""
    with open(target) as f:
        for line in f:
            if line.strip().startswith("memory_bandwidth:"):
                return float(line.split(":")[1])
    raise ValueError(f"{target} has no gpu_device_info.memory_bandwidth")


def compile_report(
    model: str, batch_size: int, image_size: int, dtype: str, target: str = DEFAULT_TARGET, tpu: str | None = None,
    peer: str | None = None, steps_per_dispatch: int = 1, recipe: str | None = None, gpus: int = 1,
    bn_relu: str = "model",
) -> tuple[dict, str]:
    """Compiles ``model``'s train step for ``target`` (or TPU ``tpu``); returns (figures, optimised HLO text).

    ``peer="flax"`` compiles the plain Flax peer's step (``benchmarks/peer_flax.py``) instead
    of the trainer's. ``steps_per_dispatch`` = k > 1 compiles k steps under one
    ``jax.lax.scan`` (``step.compile_multi_step``); traffic, kernels and floors are then per
    step (the program's divided by k), memory is the program's. ``recipe``
    (``configs/FILE.py[:variant]``): that recipe's step, as ``resnet-jax benchmark --config``.
    ``gpus`` > 1: the step with the batch split over that many GPUs; traffic, kernels, memory
    and per-image figures are then per GPU (its share of the batch). ``bn_relu``: the
    BatchNorm, one of ``bn_relu_pallas.STEP_CHOICES`` (``"model"``: the model's own, on a GPU its
    Pallas kernels; ``"xla"``: XLA's reductions; ``"pallas"``: the backward kernel alone;
    ``"fused-conv"``: the model's, with each Bottleneck's bn2 + ReLU, conv3 and bn3's statistics
    fused; ``"fused-conv1"``: with each conv1 summing bn1's statistics; ``"fused-convs"``: both;
    ``"fused-bn3"``: ``"fused-conv"`` with bn3 in the same op; ``"fused-all"``: the three).
    """
    if bn_relu != "model":
        from benchmarks.bn_relu_pallas import batch_norm

        with batch_norm(bn_relu):  # refuses an unknown choice
            report, hlo = compile_report(model, batch_size, image_size, dtype, target, tpu, peer,
                                         steps_per_dispatch, recipe, gpus)
        return {**report, "bn_relu": bn_relu}, hlo
    if gpus < 1 or (gpus > 1 and (tpu or peer is not None)) or batch_size % gpus:
        raise ValueError("gpus must be >= 1 and divide the batch; more than one is for our step on GPUs only")
    if steps_per_dispatch < 1 or (peer is not None and (steps_per_dispatch > 1 or recipe)):
        raise ValueError("steps_per_dispatch must be >= 1, and 1 for a peer; a recipe is for our step only")
    k = steps_per_dispatch
    from resnet_jax.models import model_macs
    from resnet_jax.train.benchmark import compiled_peak_bytes, device_peak_tflops

    devices = target_devices(target, tpu, gpus)
    if peer == "flax":
        from benchmarks.peer_flax import abstract_step, make_model

        step, state, batch = abstract_step(model, batch_size, image_size, dtype, devices[0])
        net = make_model(model, dtype)
    elif peer is None:
        from resnet_jax.train import sharding
        from resnet_jax.train.benchmark import benchmark_config
        from resnet_jax.train.config import load_recipe
        from resnet_jax.train.loop import setup

        config = benchmark_config(model, batch_size, image_size, dtype, recipe=load_recipe(recipe) if recipe else None)
        s = setup(config, devices=devices)
        step, net = s.train_step, s.model
        state = jax.tree_util.tree_map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.abstract_state, s.state_sharding
        )
        on_batch, steps = sharding.batch_sharding(s.mesh), ()
        if k > 1:
            from resnet_jax.train.step import compile_multi_step

            on_batch, steps = sharding.stacked_batch_sharding(s.mesh), (k,)
            step = compile_multi_step(step, s.state_sharding, on_batch, sharding.replicated(s.mesh))
        batch = {
            "image": jax.ShapeDtypeStruct(
                (*steps, batch_size, image_size, image_size, 3), jnp.dtype(dtype), sharding=on_batch
            ),
            "label": jax.ShapeDtypeStruct((*steps, batch_size), jnp.int32, sharding=on_batch),
        }
    else:
        raise ValueError(f"unknown peer {peer!r}; the one peer that compiles here is 'flax'")
    t0 = time.perf_counter()
    # jax >= 0.11's Pallas Triton lowering reads the target GPU from the default device, which
    # is the CPU without a GPU ("No supported GPU devices found"); make it the compile target.
    with jax.default_device(devices[0]):
        compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    traffic = summarise(entry_kernels(hlo))
    traffic["traffic_bytes"] /= k
    traffic["kernels"] /= k
    traffic["by_phase"] = {phase: b / k for phase, b in traffic["by_phase"].items()}
    traffic["by_kind"] = {kind: {"kernels": v["kernels"] / k, "bytes": v["bytes"] / k} for kind, v in traffic["by_kind"].items()}
    per_device = batch_size // gpus
    flops = 6 * model_macs(net, image_size) * per_device
    if tpu:
        bandwidth = TPU_BANDWIDTH[tpu.split(":")[0]]
    else:
        if target == DEFAULT_TARGET and gpu_spec(devices[0].device_kind):  # an attached H100 or H200
            target = gpu_spec(devices[0].device_kind)
        bandwidth = bandwidth_bytes_per_second(target)
    peak_tflops = device_peak_tflops(devices[0])
    if peak_tflops is None:
        raise SystemExit(f"gpu_compile_report: no peak FLOP/s known for {devices[0].device_kind}; add it to PEAK_TFLOPS")
    memory_floor = traffic["traffic_bytes"] / bandwidth
    compute_floor = flops / (peak_tflops * 1e12)
    peak = compiled_peak_bytes(compiled)
    return {
        "model": model if peer is None else f"{peer} peer {model}", "config": recipe, "batch_size": batch_size, "image_size": image_size, "dtype": dtype,
        "device_kind": devices[0].device_kind, "gpus": gpus, "bn_relu": bn_relu, "jax": jax.__version__,
        "steps_per_dispatch": k,
        "compile_seconds_host": compile_seconds,
        "argument_gib": mem.argument_size_in_bytes / 2**30,
        "temp_gib": mem.temp_size_in_bytes / 2**30,
        "output_gib": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30,
        "peak_gib": peak / 2**30,
        "temp_mib_per_image": mem.temp_size_in_bytes / 2**20 / per_device,
        "traffic_gib": traffic["traffic_bytes"] / 2**30,
        "traffic_mib_per_image": traffic["traffic_bytes"] / 2**20 / per_device,
        "kernels": traffic["kernels"],
        "traffic_by_phase_gib": {k: v / 2**30 for k, v in traffic["by_phase"].items()},
        "traffic_by_kind_gib": {k: round(v["bytes"] / 2**30, 3) for k, v in traffic["by_kind"].items()},
        "kernels_by_kind": {k: round(v["kernels"], 2) for k, v in traffic["by_kind"].items()},
        "memory_floor_ms": 1e3 * memory_floor,
        "compute_floor_ms": 1e3 * compute_floor,
        "images_per_second_ceiling": batch_size / max(memory_floor, compute_floor),
    }, hlo


def max_batch_within(args: argparse.Namespace, report: dict) -> dict:
    """The largest batch whose compiled step's buffer assignment needs at most
    ``args.max_batch_within`` GiB, searched from ``args.batch_size`` by the benchmark's own
    ``largest_fitting`` (progress on stderr). A prediction of ``--find-max-batch``: the device's
    allocator rounds and fragments, so the measured batch can be a little smaller."""
    from resnet_jax.train.benchmark import largest_fitting

    def fits(batch: int) -> bool:
        if batch == report["batch_size"]:
            needed = report["peak_gib"]
        else:
            needed = compile_report(args.model, batch, args.image_size, args.dtype, args.target, args.tpu,
                                    args.peer, args.steps_per_dispatch, args.config,
                                    bn_relu=args.bn_relu)[0]["peak_gib"]
        print(f"  batch {batch:>6}: {needed:.2f} GiB", file=sys.stderr, flush=True)
        return needed <= args.max_batch_within

    fitted, failed = largest_fitting(fits, args.batch_size, limit=16384)
    return {"max_batch": fitted, "max_batch_fails": failed, "memory_limit_gib": args.max_batch_within}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bn_relu_pallas import STEP_CHOICES as BN_RELU_CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE.py[:variant]",
                   help="compile this recipe's step (EMA, label smoothing, ...), as resnet-jax benchmark --config")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--target", default=DEFAULT_TARGET, help="GpuTargetConfigProto text file")
    p.add_argument("--tpu", metavar="TOPOLOGY",
                   help=f"compile for one chip of this TPU topology instead (needs libtpu), e.g. v5e:2x2; "
                        f"generations {', '.join(TPU_BANDWIDTH)}")
    p.add_argument("--peer", choices=["flax"],
                   help="compile the plain Flax peer's step (benchmarks/peer_flax.py) instead of ours")
    p.add_argument("--steps-per-dispatch", type=int, default=1, metavar="K",
                   help="compile K train steps under one jax.lax.scan; traffic and kernels reported per step")
    p.add_argument("--max-batch-within", type=float, metavar="GIB",
                   help="also search the largest batch whose compiled step needs at most GIB of device memory "
                        "(compile-only, as resnet-jax benchmark --find-max-batch does on the device; an H100 80GB "
                        "lets XLA allocate ~59 GiB under its default 75%% preallocation)")
    p.add_argument("--gpus", type=int, default=1,
                   help="split the batch over this many GPUs (compile-only: one host's 1x1xN topology); figures per GPU")
    p.add_argument("--bn-relu", choices=BN_RELU_CHOICES, default="model",
                   help="the BatchNorm: model (the model's own: on a GPU its Pallas kernels), xla (XLA's "
                        "reductions, the model before 2026-11-26), pallas (the backward kernel alone), fused-conv "
                        "(the model's, with each Bottleneck's bn2 + ReLU, conv3 and bn3's statistics in one kernel), "
                        "fused-conv1 (with each Bottleneck's conv1 summing bn1's statistics), fused-convs (both), fused-bn3 "
                        "(fused-conv with bn3 in the same op), fused-all (the three)")
    p.add_argument("--candidates", default="none",
                   help="changes built but off by default to switch on, names joined by '+' "
                        "(benchmarks/candidates.py, e.g. fused-conv+fused-bn3+grad-sums), or 'auto': the last "
                        "choice in $OUT/results.jsonl (the device job's); with --bn-relu too")
    p.add_argument("--top", type=int, default=0, help="list the N kernels that move the most bytes")
    p.add_argument("--dump-hlo", help="write the optimised HLO text here")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = p.parse_args(argv)
    if args.steps_per_dispatch < 1 or (args.peer and (args.steps_per_dispatch > 1 or args.config)):
        p.error("--steps-per-dispatch must be >= 1; it and --config are for our step only (not with --peer)")
    if args.tpu and args.tpu.split(":")[0] not in TPU_BANDWIDTH:
        p.error(f"--tpu {args.tpu}: unknown generation; use one of {', '.join(TPU_BANDWIDTH)}, e.g. v5e:2x2")
    if args.gpus > 1 and (args.tpu or args.peer or args.max_batch_within):
        p.error("--gpus is for our step on GPUs (not with --tpu, --peer or --max-batch-within)")
    from benchmarks.candidates import applied, choice_from_results, parse_choice, spec_of

    try:
        choice = (choice_from_results(Path(os.environ.get("OUT", "/tmp/bench_out")) / "results.jsonl")[0]
                  if args.candidates == "auto" else parse_choice(args.candidates))
    except ValueError as e:
        p.error(f"--candidates: {e}")
    with applied(choice):
        r, hlo = compile_report(
            args.model, args.batch_size, args.image_size, args.dtype, args.target, args.tpu, args.peer,
            args.steps_per_dispatch, args.config, args.gpus, args.bn_relu,
        )
        r["candidates"] = spec_of(choice)
        if args.max_batch_within:
            r.update(max_batch_within(args, r))
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(hlo)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"{r['model']} batch {r['batch_size']} @{r['image_size']}px {r['dtype']}, compiled for {r['device_kind']} "
        f"(jax {r['jax']}) in {r['compile_seconds_host']:.1f} s on the host"
        + (f"; the batch split over {r['gpus']} GPUs, figures per GPU" if r["gpus"] > 1 else "")
        + {"xla": "; BatchNorm with XLA's reductions (no Pallas kernels)",
           "pallas": "; BatchNorm with the Pallas backward kernel alone",
           "fused-conv": "; each Bottleneck's bn2 + ReLU, conv3 and bn3's statistics in one kernel",
           "fused-conv1": "; each Bottleneck's conv1 summing bn1's statistics",
           "fused-convs": "; each Bottleneck's bn2 + ReLU, conv3 and bn3's statistics in one kernel, "
                          "its conv1 summing bn1's statistics",
           "fused-bn3": "; each Bottleneck's bn2 + ReLU, conv3 and bn3 in one op (bn3's gradient computed in "
                        "conv3's backward GEMMs)",
           "fused-all": "; each Bottleneck's bn2 + ReLU, conv3 and bn3 in one op, its conv1 summing bn1's "
                        "statistics"}.get(r["bn_relu"], "")
        + (f"; {r['steps_per_dispatch']} steps per dispatch, figures per step" if r["steps_per_dispatch"] > 1 else "")
        + (f"; candidates on: {r['candidates']}" if r["candidates"] != "none" else "")
        + "\n"
        f"  memory      peak {r['peak_gib']:.2f} GiB = arguments {r['argument_gib']:.2f} + temporaries "
        f"{r['temp_gib']:.2f} ({r['temp_mib_per_image']:.1f} MiB/image) + outputs {r['output_gib']:.2f}\n"
        f"  traffic     {r['traffic_gib']:.1f} GiB per step ({r['traffic_mib_per_image']:.0f} MiB/image) in "
        f"{r['kernels']:.0f} kernels; " + ", ".join(f"{k} {v:.1f}" for k, v in r["traffic_by_phase_gib"].items()) + "\n"
        f"  floors      memory {r['memory_floor_ms']:.1f} ms, compute {r['compute_floor_ms']:.1f} ms per step: "
        f"at most {r['images_per_second_ceiling']:.0f} images/s"
    )
    if "max_batch" in r:
        print(f"  largest batch within {r['memory_limit_gib']:.1f} GiB: {r['max_batch']}"
              + (f" ({r['max_batch_fails']} needs more)" if r["max_batch_fails"] else " (the search stops there)"))
    for kind, gib in list(r["traffic_by_kind_gib"].items())[:8]:
        print(f"  {gib:8.2f} GiB  {kind}")
    if args.top:
        print(f"  the {args.top} kernels that move the most bytes:")
        unique = {k.name: k for k in entry_kernels(hlo)}.values()  # a loop body's kernels once, not per step
        for k in sorted(unique, key=lambda k: -k.bytes)[: args.top]:
            print(f"  {k.bytes / 2**20:8.0f} MiB  {k.phase:<8} {k.kind:<28} {k.op_name.split('jit(train_step)/')[-1][-80:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
