"""The HBM-traffic count of benchmarks/hlo_traffic.py against programs whose traffic is known in closed form."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks.hlo_traffic import entry_kernels, shape_bytes, summarise
from tests.conftest import require_cuda_plugin

MIB = 2**20


def test_shape_bytes_of_arrays_and_tuples():
    assert shape_bytes("bf16[256,56,56,64]{3,2,1,0}") == 256 * 56 * 56 * 64 * 2
    assert shape_bytes("(f32[8,4]{1,0}, pred[3]{0}, s32[])") == 8 * 4 * 4 + 3 + 4
    assert shape_bytes("u8[0]{0}") == 0


def test_one_fused_elementwise_kernel_reads_its_inputs_and_writes_its_output_once():
    a = jnp.ones((512, 512), jnp.float32)
    hlo = jax.jit(lambda a, b: jnp.tanh(a * b + 1)).lower(a, a).compile().as_text()
    kernels = entry_kernels(hlo)
    assert len(kernels) == 1
    assert (kernels[0].read_bytes, kernels[0].write_bytes) == (2 * MIB, 1 * MIB)


def test_a_row_reduction_reads_the_matrix_and_writes_one_value_per_row():
    x = jnp.ones((1024, 1024), jnp.float32)
    s = summarise(entry_kernels(jax.jit(lambda x: jnp.sum(x, axis=1)).lower(x).compile().as_text()))
    assert s["traffic_bytes"] == 4 * MIB + 1024 * 4, s


def test_forward_and_backward_kernels_are_told_apart():
    x = jnp.ones((256, 256), jnp.float32)
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(x) ** 2))).lower(x).compile().as_text()
    phases = {k.phase for k in entry_kernels(hlo)}
    assert phases <= {"forward", "backward", "other"} and phases & {"forward", "backward"}


def test_h100_target_compiles_without_a_gpu():
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import DEFAULT_TARGET, target_devices

    device = target_devices(DEFAULT_TARGET)[0]
    assert "H100" in device.device_kind
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
    kernels = entry_kernels(jax.jit(lambda a: jnp.maximum(a, 0) * 2).lower(x).compile().as_text())
    assert sum(k.bytes for k in kernels) == 2 * 4096 * 4096 * 2


def test_an_all_reduce_counts_once():
    """Over two H100s a sum across devices is one all-reduce of a 4 MiB buffer: read and
    written once, not twice. jax 0.10's XLA emits it as an asynchronous all-reduce-start /
    -done pair (the bytes count at the start), jax 0.11's as one synchronous all-reduce."""
    require_cuda_plugin()
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from benchmarks.gpu_compile_report import DEFAULT_TARGET

    with open(DEFAULT_TARGET) as f:
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x2", target_config=f.read())
    mesh = Mesh(np.array(topology.devices), ("d",))
    x = jax.ShapeDtypeStruct((2, 1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    summed = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    kernels = entry_kernels(summed.lower(x).compile().as_text())
    collectives = [k for k in kernels if k.kind.startswith("all-reduce")]
    assert [(k.read_bytes, k.write_bytes) for k in collectives] == [(4 * MIB, 4 * MIB)]
    assert collectives[0].kind in ("all-reduce-start", "all-reduce")


def test_a_kernel_with_six_or_more_results_is_counted():
    """XLA prints tuples of more than five elements with an "/*index=5*/" comment inside;
    a seven-operand sort (one kernel returning a 7-tuple) reads and writes 7 x 4 KiB."""
    x = jnp.ones((1024,), jnp.float32)
    hlo = jax.jit(lambda *xs: jax.lax.sort(xs, num_keys=1)).lower(*[x] * 7).compile().as_text()
    assert "/*index=5*/" in hlo
    (kernel,) = entry_kernels(hlo)
    assert (kernel.kind, kernel.read_bytes, kernel.write_bytes) == ("sort", 7 * 4096, 7 * 4096)


def test_an_instruction_the_parser_cannot_read_is_an_error_not_a_silent_skip():
    hlo = "HloModule m\n\nENTRY %main () -> f32[] {\n  %weird = f32[] <unparseable>\n}\n"
    with pytest.raises(ValueError, match="cannot parse"):
        entry_kernels(hlo)


def test_kernels_inside_a_command_buffer_call_are_counted():
    """On a GPU, XLA wraps runs of kernels in ``call(...), to_apply=%command_buffer`` (a CUDA
    graph). The call moves nothing itself; the two fusions inside move 3 MiB and 2 MiB."""
    hlo = """HloModule m

%fused_a (p0: f32[512,512]) -> f32[512,512] {
  %p0 = f32[512,512]{1,0} parameter(0)
  ROOT %t = f32[512,512]{1,0} tanh(%p0)
}

%command_buffer (x.1: f32[512,512], y.1: f32[512,512]) -> (f32[512,512], f32[512,512]) {
  %x.1 = f32[512,512]{1,0} parameter(0)
  %y.1 = f32[512,512]{1,0} parameter(1)
  %add_fusion = f32[512,512]{1,0} fusion(%x.1, %y.1), kind=kLoop, calls=%fused_a
  %tanh_fusion = f32[512,512]{1,0} fusion(%add_fusion), kind=kLoop, calls=%fused_a
  ROOT %tuple = (f32[512,512]{1,0}, f32[512,512]{1,0}) tuple(%add_fusion, %tanh_fusion)
}

ENTRY %main (x: f32[512,512], y: f32[512,512]) -> (f32[512,512], f32[512,512]) {
  %x = f32[512,512]{1,0} parameter(0)
  %y = f32[512,512]{1,0} parameter(1)
  ROOT %call = (f32[512,512]{1,0}, f32[512,512]{1,0}) call(%x, %y), to_apply=%command_buffer
}
"""
    kernels = entry_kernels(hlo)
    assert [(k.name, k.read_bytes, k.write_bytes) for k in kernels] == [
        ("add_fusion", 2 * MIB, MIB), ("tanh_fusion", MIB, MIB)]


def test_a_scan_counts_its_body_once_per_iteration_and_only_the_slice_it_reads():
    """``jax.lax.scan`` of ``c = tanh(c * x)`` over four 2 MiB bf16 slices, compiled for the
    H100: a while loop whose body is one fusion reading the carry and its step's slice of the
    stacked input (2 + 2 MiB, not the whole 8 MiB) and writing the carry (2 MiB), four times;
    the loop condition compares two scalars five times."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import DEFAULT_TARGET, target_devices

    on = jax.sharding.SingleDeviceSharding(target_devices(DEFAULT_TARGET)[0])
    carry = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=on)
    stacked = jax.ShapeDtypeStruct((4, 1024, 1024), jnp.bfloat16, sharding=on)
    scan = jax.jit(lambda c, xs: jax.lax.scan(lambda c, x: (jnp.tanh(c * x), None), c, xs)[0], donate_argnums=0)
    kernels = entry_kernels(scan.lower(carry, stacked).compile().as_text())
    big = [(k.read_bytes // MIB, k.write_bytes // MIB) for k in kernels if k.bytes > MIB]
    assert big == [(4, 2)] * 4, big
    assert sum(k.bytes for k in kernels if k.bytes <= MIB) < 1024  # loop counter and condition only


def test_a_loop_without_a_known_trip_count_is_an_error():
    hlo = """HloModule m

%cond (p: s32[]) -> pred[] {
  %p = s32[] parameter(0)
  ROOT %lt = pred[] compare(%p, %p), direction=LT
}

%body (q: s32[]) -> s32[] {
  ROOT %q = s32[] parameter(0)
}

ENTRY %main (x: s32[]) -> s32[] {
  %x = s32[] parameter(0)
  ROOT %w = s32[] while(%x), condition=%cond, body=%body
}
"""
    with pytest.raises(ValueError, match="no known_trip_count"):
        entry_kernels(hlo)


def test_the_train_step_scanned_three_times_runs_one_steps_convolutions_per_step():
    """``gpu_compile_report --steps-per-dispatch 3`` (three trainer steps under one scan,
    compiled for the H100) reports per step the cuDNN convolutions of one step: the same
    count and bytes of each kind (the loop body counted three times, divided by three).
    The rest may differ: XLA lays out the loop-carried weights its own way."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report

    one, _ = compile_report("resnet18", 16, 64, "bfloat16")
    three, hlo = compile_report("resnet18", 16, 64, "bfloat16", steps_per_dispatch=3)
    assert " while(" in hlo and three["steps_per_dispatch"] == 3
    convolutions = {kind for kind in one["traffic_by_kind_gib"] if kind.startswith("__cudnn$conv")}
    assert len(convolutions) >= 3
    for kind in convolutions:
        assert three["kernels_by_kind"][kind] == one["kernels_by_kind"][kind], kind
        assert three["traffic_by_kind_gib"][kind] == pytest.approx(one["traffic_by_kind_gib"][kind], rel=1e-3), kind


def test_max_batch_within_a_memory_limit_compiled_for_the_h100(capsys):
    """``gpu_compile_report --max-batch-within GIB``: with the limit just above what the
    batch-16 step needs (compiled for the H100), 16 is the largest batch and 24 needs more."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report, main

    needed_16 = compile_report("resnet18", 16, 32, "bfloat16")[0]["peak_gib"]
    assert main(["--model", "resnet18", "--batch-size", "16", "--image-size", "32", "--json",
                 "--max-batch-within", str(needed_16 * 1.0001)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["max_batch"], r["max_batch_fails"]) == (16, 24)
    assert r["peak_gib"] == pytest.approx(needed_16)


def test_the_step_copies_no_weights_into_the_donated_state_with_its_gradients_laid_out_or_its_state_kept(
        monkeypatch):
    """Changes 20 and 21's candidates, compiled for the H100 (ResNet-18, batch 16 at 64px).
    Donated, each conv weight and its momentum are updated in a kernel that reads the gradient in
    cuDNN's filter layout, then copied into the donated buffers: 16 bytes moved per conv weight
    element (a float32 read and written, twice). With the gradients in the
    parameters' layout (``step.GRADS_IN_PARAM_LAYOUT``) the update runs in place: no copy of a
    weight, fewer kernels and fewer bytes after the backward pass, the same peak. With the state
    kept (``step.DONATE_STATE`` off) no weight is copied either, and the new state is a fresh
    output the size of the state."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report
    from resnet_jax.models import create_model
    from resnet_jax.train import step

    params = jax.eval_shape(lambda: create_model("resnet18").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                                  train=False))["params"]
    conv_weights = [leaf for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 4]
    found = {}
    for name, donate, layout in (("donated", True, False), ("laid out", True, True), ("kept", False, False)):
        monkeypatch.setattr(step, "DONATE_STATE", donate)
        monkeypatch.setattr(step, "GRADS_IN_PARAM_LAYOUT", layout)
        report, hlo = compile_report("resnet18", 16, 64, "bfloat16")
        kernels = entry_kernels(hlo)
        weight_copies = [k for k in kernels if k.kind == "copy" and k.bytes >= 1024]  # not a BatchNorm's (C,)
        after_backward = sum(k.bytes for k in kernels if k.phase == "other")
        found[name] = report, weight_copies, after_backward
    (donated, copies, donated_after), (laid_out, laid_out_copies, laid_out_after), (kept, kept_copies, _) = (
        found["donated"], found["laid out"], found["kept"])
    assert sum(k.bytes for k in copies) == pytest.approx(16 * sum(w.size for w in conv_weights), rel=0.01)
    assert laid_out_copies == kept_copies == []
    assert laid_out["kernels"] < donated["kernels"] and laid_out_after < donated_after
    assert laid_out["peak_gib"] <= donated["peak_gib"] and laid_out["output_gib"] < 1e-3
    assert kept["kernels"] < laid_out["kernels"]
    assert donated["output_gib"] < 1e-3 < kept["output_gib"]


def test_the_fused_stem_backward_reads_its_input_twice_and_writes_one_gradient(monkeypatch):
    """Change 22's candidate (``layers.FUSE_STEM_POOL``), compiled for the H100 (ResNet-18, batch
    16 at 64px). In units of the stem BatchNorm's bf16 input x (16 x 32 x 32 x 64), the
    BatchNorm + pool + ReLU backward is two kernels: the sums read x, the pooled cotangent
    (1/4) and one int8 per pooled output (1/8); dx reads them again and writes 1: 3.75 units.
    The layers one after another move more: at this size XLA builds the pool's gradient inside
    its two BatchNorm reductions, which read the pooled cotangent with its ReLU mask and the
    pool's tap index at full resolution (5.7 units); in ResNet-50's step at batch 256 it writes
    that gradient and reads it twice (7.1 units, docs/performance.md). The peak does not grow."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report
    from resnet_jax.models import layers

    unit = 16 * 32 * 32 * 64 * 2
    found = {}
    for fused in (False, True):
        monkeypatch.setattr(layers, "FUSE_STEM_POOL", fused)
        report, hlo = compile_report("resnet18", 16, 64, "bfloat16")
        stem_backward = [k for k in entry_kernels(hlo) if k.phase == "backward" and "/stem/" in k.op_name
                         and "/stem/conv1/" not in k.op_name]  # the BatchNorm, pool and ReLU
        found[fused] = report, stem_backward
    (plain, plain_kernels), (fused, fused_kernels) = found[False], found[True]
    names = " ".join(k.op_name for k in fused_kernels)
    assert "batch_norm_pool_relu_grad_sums" in names and "batch_norm_pool_relu_grad_x" in names
    fused_bytes = sum(k.bytes for k in fused_kernels)
    assert fused_bytes == pytest.approx(3.75 * unit, rel=0.03)
    assert sum(k.bytes for k in plain_kernels) >= fused_bytes + 1.5 * unit
    assert fused["peak_gib"] <= plain["peak_gib"]


def test_a_scatter_reads_and_writes_only_the_elements_it_updates():
    """``g.at[:, ::2, ::2, :].add(u)`` compiled for the H100, g a donated 2 MiB bf16 buffer and u
    its 512 KiB subsample: one in-place scatter fusion that reads u and the quarter of g it
    updates and writes that quarter (the indices are built inside the fusion). Not donated, XLA
    first copies g whole, a kernel of its own (2 MiB read, 2 MiB written). With g in float32,
    the quarter it touches is float32. Rows given as data count g whole, read and written."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import DEFAULT_TARGET, target_devices

    on = jax.sharding.SingleDeviceSharding(target_devices(DEFAULT_TARGET)[0])
    u = jax.ShapeDtypeStruct((16, 16, 16, 64), jnp.bfloat16, sharding=on)
    quarter = 16 * 16 * 16 * 64 * 2

    def counted(g_dtype, donate):
        g = jax.ShapeDtypeStruct((16, 32, 32, 64), g_dtype, sharding=on)
        add = jax.jit(lambda g, u: g.at[:, ::2, ::2, :].add(u.astype(g.dtype), indices_are_sorted=True,
                                                           unique_indices=True),
                      donate_argnums=(0,) if donate else ())
        return [(k.kind, k.read_bytes, k.write_bytes) for k in entry_kernels(add.lower(g, u).compile().as_text())]

    assert counted(jnp.bfloat16, True) == [("fusion:kInput", 2 * quarter, quarter)]
    assert counted(jnp.bfloat16, False) == [("copy", 4 * quarter, 4 * quarter), ("fusion:kInput", 2 * quarter, quarter)]
    assert counted(jnp.float32, True) == [("fusion:kInput", 3 * quarter, 2 * quarter)]
    # positions given as data (as a max pool's gradient has them) may land anywhere: g counts whole
    g = jax.ShapeDtypeStruct((16 * 32 * 32, 64), jnp.bfloat16, sharding=on)
    rows = jax.ShapeDtypeStruct((16 * 16 * 16,), jnp.int32, sharding=on)
    updates = jax.ShapeDtypeStruct((16 * 16 * 16, 64), jnp.bfloat16, sharding=on)
    add = jax.jit(lambda g, rows, u: g.at[rows].add(u, unique_indices=True), donate_argnums=0)
    kernels = entry_kernels(add.lower(g, rows, updates).compile().as_text())
    assert sum(k.bytes for k in kernels) >= 2 * 4 * quarter + quarter, kernels


def test_the_strided_shortcuts_gradient_is_added_in_place(monkeypatch):
    """Change 23, on with change 13's projection shortcut (``layers.FUSE_SHORTCUT``), compiled for
    the H100 (ResNet-18, batch 16 at 64px). Each of the three stride-2 projections hands its
    input gradient to the block input's as one in-place scatter: it reads the subsample's
    gradient q and the quarter of the input's gradient it updates (q) and writes that quarter,
    3 q, and no backward kernel pads. Slicing's transpose makes XLA write or read the padded
    gradient at full size; adding it to the branch's reads the branch's gradient u = 4 q and
    writes the sum, at least 2 u + q, so the step moves at least 1.5 u of layer2_0's input less
    (measured: 1.06 MiB, 1.5 u = 0.75 MiB). The peak does not grow."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report
    from resnet_jax.models import layers

    monkeypatch.setattr(layers, "FUSE_SHORTCUT", True)
    found = {}
    for in_place in (False, True):
        monkeypatch.setattr(layers, "SUBSAMPLE_GRAD_IN_PLACE", in_place)
        found[in_place] = compile_report("resnet18", 16, 64, "bfloat16")
    (plain, plain_hlo), (fanned, fanned_hlo) = found[False], found[True]
    backward = [k for k in entry_kernels(fanned_hlo) if k.phase == "backward"]
    scatters = {k.op_name.split("/")[-2]: (k.read_bytes, k.write_bytes) for k in backward if "scatter" in k.op_name}
    # the subsample's gradient q of layer{2,3,4}_0's input: 16 x 16 x 16 x 64 bf16, then half the
    # pixels and twice the channels each stage
    q = {f"layer{stage}_0": 16 * 8 * 8 * 64 * 2 // 2 ** (stage - 2) for stage in (2, 3, 4)}
    assert scatters == {name: (2 * bytes_, bytes_) for name, bytes_ in q.items()}, scatters
    assert not [k for k in backward if k.op_name.endswith("/pad")]
    assert any(k.op_name.endswith("/pad") or "add_any" in k.op_name
               for k in entry_kernels(plain_hlo) if k.phase == "backward" and "layer2_0" in k.op_name)
    saved = sum(k.bytes for k in entry_kernels(plain_hlo)) - sum(k.bytes for k in entry_kernels(fanned_hlo))
    assert saved >= 1.5 * 4 * q["layer2_0"], saved
    assert fanned["peak_gib"] <= plain["peak_gib"]
