"""benchmarks/kernel_bandwidth.py joins a jax.profiler trace with the HLO's bytes per kernel."""


import jax
import jax.numpy as jnp
import pytest

from benchmarks.kernel_bandwidth import HLO_FILE, report

MIB = 2**20


def test_a_traced_elementwise_kernel_gets_its_closed_form_bytes_and_its_launch_count(tmp_path):
    """tanh(a * b + 1) on two 1 MiB float32 matrices, called 3 times: one kernel that reads
    2 MiB and writes 1 MiB per call."""
    a = jnp.ones((512, 512), jnp.float32)
    f = jax.jit(lambda a, b: jnp.tanh(a * b + 1))
    compiled = f.lower(a, a).compile()
    (tmp_path / HLO_FILE).write_text(compiled.as_text())
    compiled(a, a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        compiled(a, a).block_until_ready()
    jax.profiler.stop_trace()

    r = report(str(tmp_path), bandwidth=1e9)
    assert r["steps"] == 3
    assert r["unmatched_ms"] == 0
    (row,) = r["kernels"]
    assert row["bytes"] == 3 * MIB == r["bytes_per_step"]
    assert row["ms"] > 0 and row["ms"] == pytest.approx(r["device_busy_ms"])
    # at 1 GB/s the 3 MiB take 3.15 ms; what the kernel took beyond that is "lost"
    assert row["floor_ms"] == pytest.approx(3 * MIB / 1e9 * 1e3)
    assert row["lost_ms"] == pytest.approx(row["ms"] - row["floor_ms"])
    assert row["gb_per_s"] == pytest.approx(3 * MIB / (row["ms"] / 1e3) / 1e9)
    # 3 MiB per launch is not a small kernel at the default 1 MiB; under a 4 MiB bound it is
    assert r["small_kernels"] == {"below_bytes": MIB, "launches_per_step": 0, "ms": 0, "bytes": 0}
    small = report(str(tmp_path), bandwidth=1e9, small_bytes=4 * MIB)["small_kernels"]
    assert small["launches_per_step"] == 1 and small["bytes"] == 3 * MIB
    assert small["ms"] == pytest.approx(row["ms"])


def test_a_directory_without_a_trace_is_refused_with_the_command_that_makes_one(tmp_path):
    with pytest.raises(SystemExit, match="resnet-jax benchmark --profile"):
        report(str(tmp_path), hlo_text="")


def test_a_gpu_planes_recorded_bandwidth_and_compute_capability_are_read():
    """The stats the CUDA profiler puts on a device plane (no device name among them): an H100
    SXM's 2 x 2,619 MHz x 5,120-bit HBM3 is 3.352 TB/s, the figure of gpu_specs/h100_sxm."""
    from benchmarks.gpu_compile_report import DEFAULT_TARGET, bandwidth_bytes_per_second
    from benchmarks.kernel_bandwidth import device_properties

    h100 = {"clock_rate": 1980000, "core_count": 132, "memory_bandwidth": 2 * 2_619_000_000 * 5120 // 8,
            "compute_cap_major": 9, "compute_cap_minor": 0}
    kind, bandwidth = device_properties(h100)
    assert kind == "GPU compute capability 9.0"
    assert bandwidth == pytest.approx(bandwidth_bytes_per_second(DEFAULT_TARGET), rel=1e-4)
    assert device_properties({"device_type_string": "cpu"}) == ("cpu", None)
