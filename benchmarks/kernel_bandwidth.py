"""Where a profiled train step loses time against its memory floor: each kernel's time and bandwidth.

    resnet-jax benchmark --model resnet50 --batch-size 256 --profile /tmp/prof   # on the device
    python3 benchmarks/kernel_bandwidth.py /tmp/prof [--top 25] [--json]

``resnet-jax benchmark --profile DIR`` traces the last timed window with ``jax.profiler``
and writes the compiled step's optimised HLO next to it (``train_step.hlo.txt``). This
joins the two: the trace gives each kernel's device time (events carry the HLO
instruction that launched them, stat ``hlo_op``), :mod:`benchmarks.hlo_traffic` gives
the bytes that instruction reads and writes. Per step it reports the device time, the
time the bytes alone would take at the device's peak bandwidth, and for each
instruction ``lost = time - bytes / peak``: the kernels to fix first, whether they are
slow reductions, cuDNN algorithms or launch gaps (``device busy`` against the step).

Peak bandwidth comes from ``--bandwidth`` (bytes/s); else, for a device kind in the trace
that ``benchmarks/gpu_specs/`` describes (H100/H200 SXM), from its target file (the figure
``gpu_compile_report`` uses); else from the ``memory_bandwidth`` stat that the CUDA
profiler puts on a GPU's device plane (2 x memory clock x bus width); otherwise (a CPU
trace) only times are reported. The report says which source it used.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_compile_report import bandwidth_bytes_per_second, gpu_spec  # noqa: E402
from benchmarks.hlo_traffic import FREE_OPCODES, Kernel, entry_instructions, entry_kernels  # noqa: E402
from resnet_jax.train.benchmark import PROFILE_HLO_FILE as HLO_FILE  # noqa: E402


def device_properties(plane_stats: dict) -> tuple[str, float | None]:
    """(device kind, peak memory bytes/s or None) from a trace plane's stats: the kind from
    a name stat, else the compute capability a GPU plane records; the bandwidth from the
    ``memory_bandwidth`` stat of a GPU plane."""
    kind = next((str(plane_stats[k]) for k in ("device_type_string", "devtype", "device_name") if k in plane_stats), "")
    if not kind and "compute_cap_major" in plane_stats:
        kind = f"GPU compute capability {plane_stats['compute_cap_major']}.{plane_stats.get('compute_cap_minor', 0)}"
    bandwidth = plane_stats.get("memory_bandwidth")
    return kind, float(bandwidth) if bandwidth else None


def kernel_times(profile_dir: str) -> tuple[dict[tuple[str, str], list[float]], str, float, float | None]:
    """Device seconds of every launch, keyed by (device, launching HLO instruction); the
    device kind; the seconds of device events that name no instruction; and the peak
    memory bandwidth the trace records for the device (bytes/s), if any.

    Events on device planes (``/device:GPU:0`` ...) are used when the trace has them;
    a CPU-only trace has its thunks on the host plane instead (device: their
    ``device_ordinal``). Kernels run inside an XLA command buffer (a CUDA graph, on by
    default on GPUs) carry no instruction name: their time is the third value.
    """
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise SystemExit(
            f"kernel_bandwidth: no *.xplane.pb under {profile_dir}; "
            "make one with `resnet-jax benchmark --profile DIR`"
        )
    data = ProfileData.from_file(files[-1])
    planes = list(data.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    kind, trace_bandwidth = "", None
    unattributed = 0.0
    for plane in device_planes or planes:
        plane_kind, plane_bandwidth = device_properties(dict(plane.stats))
        kind, trace_bandwidth = kind or plane_kind, trace_bandwidth or plane_bandwidth
        lines = list(plane.lines)
        if device_planes:
            # a GPU plane's raw activity is on its "Stream #N(...)" lines; lines derived from
            # them (XLA Ops, XLA Modules), where present, would count the same kernels again
            lines = [line for line in lines if line.name.startswith("Stream")] or lines
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op:
                    device = plane.name if device_planes else str(stats.get("device_ordinal", "0"))
                    times[(device, str(op))].append(event.duration_ns * 1e-9)
                elif device_planes:
                    unattributed += event.duration_ns * 1e-9
    if not times:
        raise SystemExit(
            f"kernel_bandwidth: {files[-1]} has no events that name their HLO instruction (hlo_op); on a GPU, "
            f"trace with command buffers off: XLA_FLAGS=--xla_gpu_enable_command_buffer="
        )
    return times, kind or (device_planes[0].name if device_planes else "cpu"), unattributed, trace_bandwidth


def _normalise(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


SMALL_KERNEL_BYTES = 2**20


def report(profile_dir: str, hlo_text: str | None = None, bandwidth: float | None = None,
           steps: int | None = None, small_bytes: int = SMALL_KERNEL_BYTES) -> dict:
    """Per-step device time and the instructions that lose the most time against peak bandwidth.

    Times are per step and per device (the mean over the devices traced); bytes are the
    HLO's, which is per device under SPMD. ``steps``: how many steps the trace holds; by
    default the median launch count of the traced instructions on one device (most run
    once per step). ``small_kernels`` sums the instructions that move fewer than
    ``small_bytes`` (default 1 MiB) per launch: their launches per step, time and bytes. Their
    time is latency, not bandwidth (BatchNorm's per-channel passes, optimizer updates,
    weight layout copies).
    """
    if hlo_text is None:
        with open(os.path.join(profile_dir, HLO_FILE)) as f:
            hlo_text = f.read()
    launches, kind, unattributed_seconds, trace_bandwidth = kernel_times(profile_dir)
    kernels = {_normalise(k.name): k for k in entry_kernels(hlo_text)}
    # Instructions hlo_traffic counts as moving no bytes (partition-id ...) can still run as
    # a tiny thunk on some backends: known, with zero bytes, not "unmatched".
    for name, _, opcode, _ in entry_instructions(hlo_text):
        if opcode in FREE_OPCODES:
            kernels.setdefault(_normalise(name), Kernel(name, opcode, "other", "", 0, 0))
    if steps is None:
        steps = max(1, round(statistics.median(len(v) for v in launches.values())))
    devices = len({device for device, _ in launches})
    times: dict[str, float] = collections.defaultdict(float)  # seconds per step on one device (mean)
    for (_, op), durations in launches.items():
        times[op] += sum(durations) / (steps * devices)
    source = "--bandwidth" if bandwidth else None
    spec = gpu_spec(kind)
    if bandwidth is None and spec:
        bandwidth, source = bandwidth_bytes_per_second(spec), os.path.relpath(spec)  # gpu_compile_report's figure
    elif bandwidth is None and trace_bandwidth:
        bandwidth, source = trace_bandwidth, "the trace's memory_bandwidth"
    rows, unmatched = [], 0.0
    for op, seconds in times.items():
        k = kernels.get(_normalise(op))
        if k is None:
            unmatched += seconds
            rows.append({"op": op, "kind": "?", "phase": "?", "ms": 1e3 * seconds, "bytes": None})
            continue
        row = {"op": op, "kind": k.kind, "phase": k.phase, "ms": 1e3 * seconds, "bytes": k.bytes,
               "op_name": k.op_name.split("jit(train_step)/")[-1][-90:]}
        if seconds > 0:
            row["gb_per_s"] = k.bytes / seconds / 1e9
        if bandwidth:
            row["floor_ms"] = 1e3 * k.bytes / bandwidth
            row["lost_ms"] = row["ms"] - row["floor_ms"]
        rows.append(row)
    busy = sum(r["ms"] for r in rows)
    small = [r for r in rows if r["bytes"] is not None and r["bytes"] < small_bytes]
    small_ops = {r["op"] for r in small}
    small_kernels = {
        "below_bytes": small_bytes,
        "launches_per_step": sum(len(v) for (_, op), v in launches.items() if op in small_ops) / (steps * devices),
        "ms": sum(r["ms"] for r in small),
        "bytes": sum(r["bytes"] for r in small),
    }
    matched_bytes = sum(r["bytes"] or 0 for r in rows)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        by_kind[f"{r['phase']} {r['kind']}"] += r["ms"]
    key = "lost_ms" if bandwidth else "ms"
    rows.sort(key=lambda r: -(r.get(key) if r.get(key) is not None else r["ms"]))
    return {
        "device": kind, "devices": devices, "steps": steps, "device_busy_ms": busy, "unmatched_ms": 1e3 * unmatched,
        "unattributed_ms": 1e3 * unattributed_seconds / (steps * devices),
        "bytes_per_step": matched_bytes, "peak_bandwidth": bandwidth, "peak_bandwidth_source": source,
        "memory_floor_ms": 1e3 * matched_bytes / bandwidth if bandwidth else None,
        "achieved_gb_per_s": matched_bytes / (busy / 1e3) / 1e9 if busy else None,
        "ms_by_phase_and_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "small_kernels": small_kernels,
        "kernels": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile_dir", help="the --profile directory of resnet-jax benchmark")
    p.add_argument("--hlo", help=f"optimised HLO text (default: PROFILE_DIR/{HLO_FILE})")
    p.add_argument("--bandwidth", type=float, help="peak bytes/s (default: from the device kind)")
    p.add_argument("--steps", type=int, help="steps in the trace (default: inferred)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    hlo = open(args.hlo).read() if args.hlo else None
    r = report(args.profile_dir, hlo, args.bandwidth, args.steps)
    if args.json:
        print(json.dumps(r))
        return 0
    floor = (
        f", memory floor {r['memory_floor_ms']:.2f} ms at {r['peak_bandwidth'] / 1e12:.2f} TB/s "
        f"({r['peak_bandwidth_source']})" if r["memory_floor_ms"] else ""
    )
    print(
        f"{r['device']}: {r['steps']} steps traced; per step the device is busy {r['device_busy_ms']:.2f} ms "
        f"moving {r['bytes_per_step'] / 2**30:.1f} GiB ({r['achieved_gb_per_s'] or 0:.0f} GB/s){floor}; "
        f"{r['unmatched_ms']:.2f} ms in kernels not found in the HLO"
    )
    if r["unattributed_ms"] > 0.05 * r["device_busy_ms"]:
        print(
            f"  warning: {r['unattributed_ms']:.2f} ms per step ran in device events that name no HLO instruction "
            "(kernels inside an XLA command buffer); for a complete attribution profile with "
            "XLA_FLAGS=--xla_gpu_enable_command_buffer="
        )
    small = r["small_kernels"]
    print(
        f"  {small['launches_per_step']:.0f} launches per step move under {small['below_bytes'] / 2**20:g} MiB each: "
        f"{small['ms']:.2f} ms ({100 * small['ms'] / max(r['device_busy_ms'], 1e-9):.1f}% of the busy time) "
        f"for {small['bytes'] / 2**20:.1f} MiB"
    )
    for k, ms in list(r["ms_by_phase_and_kind"].items())[:10]:
        print(f"  {ms:8.2f} ms  {k}")
    print(f"  the {args.top} instructions that lose the most time" + (" against peak bandwidth:" if r["peak_bandwidth"] else ":"))
    for row in r["kernels"][: args.top]:
        gbs = f"{row['gb_per_s']:6.0f} GB/s" if row.get("gb_per_s") else "     - GB/s"
        lost = f"lost {row['lost_ms']:6.3f}" if row.get("lost_ms") is not None else ""
        print(f"  {row['ms']:7.3f} ms {gbs} {lost}  {row['kind']:<26} {row.get('op_name') or row['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
