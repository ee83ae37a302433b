"""The fused-conv device job (``benchmarks/fused_conv_pallas.py``): what it compares is the same
function both ways, and its block specs are checked before anything runs."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import fused_conv_pallas


def test_the_model_block_and_the_fused_one_compute_the_same_forward_and_backward():
    """Both sides of the job's block timing, their kernels under the interpreter: z, its moments
    and all six gradients agree to bf16 rounding (the job reports the same difference on the
    device), so the timing compares like with like."""
    shape, n = (2, 4, 4, 16), 64
    operands = fused_conv_pallas.block_operands(shape, n, jnp.bfloat16)
    model = fused_conv_pallas.block("model", jnp.bfloat16, interpret=True)(*operands)
    fused = fused_conv_pallas.block("fused", jnp.bfloat16, interpret=True)(*operands)
    _assert_within_bf16_rounding(("z", "moments", "dx", "dmean", "dvar", "dscale", "dbias", "dkernel"), model, fused)


def _assert_within_bf16_rounding(names, model, fused):
    assert len(model) == len(fused) == len(names)
    for name, m, f in zip(names, model, fused):
        assert m.shape == f.shape, name
        scale = float(jnp.max(jnp.abs(m.astype(jnp.float32)))) + 1e-30
        # bf16 keeps 8 bits: a few roundings apart at most, relative to the largest value
        assert float(jnp.max(jnp.abs(m.astype(jnp.float32) - f.astype(jnp.float32)))) / scale < 2**-5, name


def test_the_five_tails_compute_the_same_forward_and_backward():
    """The tail timing's five sides (the model's, changes 9, 11, 15 and 16's) compute the same
    function: the block's output and the gradients of all nine inputs agree to 1e-4 in float32.
    (In bf16 a few outputs sit within rounding of the final ReLU's threshold, where each side's
    rounding can flip the mask: on 32 rows that moves dx by several percent, so the check is
    made where it means something.)"""
    shape, n = (2, 4, 4, 16), 64
    operands = fused_conv_pallas.tail_operands(shape, n, jnp.float32)
    names = ("out", "dx", "dmean", "dvar", "dscale", "dbias", "dkernel", "dnext_scale", "dnext_bias", "dshortcut")
    model = fused_conv_pallas.tail_block("model", jnp.float32, interpret=True)(*operands)
    for impl in ("fused", "fused-bn3", "fused-gram", "fused-residual"):
        got = fused_conv_pallas.tail_block(impl, jnp.float32, interpret=True)(*operands)
        assert len(got) == len(model) == len(names)
        for name, m, f in zip(names, model, got):
            assert float(jnp.max(jnp.abs(m - f))) <= 1e-4 * (float(jnp.max(jnp.abs(m))) + 1e-30), (impl, name)


def test_the_model_conv1_block_and_the_fused_one_compute_the_same_forward_and_backward():
    """The same for the conv1 -> bn1 + ReLU timing: y and the four gradients agree to bf16 rounding."""
    shape, n = (2, 4, 4, 64), 16
    operands = fused_conv_pallas.conv1_operands(shape, n, jnp.bfloat16)
    model = fused_conv_pallas.conv1_block("model", jnp.bfloat16, interpret=True)(*operands)
    fused = fused_conv_pallas.conv1_block("fused", jnp.bfloat16, interpret=True)(*operands)
    _assert_within_bf16_rounding(("y", "dx", "dkernel", "dscale", "dbias"), model, fused)


def test_block_specs_name_every_parameter_or_are_refused():
    assert fused_conv_pallas.parse_spec("128x128x64x8x2", fused_conv_pallas.FORWARD_BLOCKS) == {
        "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "NUM_WARPS": 8, "NUM_STAGES": 2}
    for bad in ("128x128x64x8", "128x128x64x8x0", "128xtwox64x8x2"):
        with pytest.raises(ValueError, match="BLOCK_M"):
            fused_conv_pallas.parse_spec(bad, fused_conv_pallas.FORWARD_BLOCKS)
    with pytest.raises(SystemExit):
        fused_conv_pallas.main(["--wgrad-blocks", "64x128"])


def test_on_a_cpu_the_job_says_what_it_left_for_the_gpu(capsys):
    fused_conv_pallas.main(["--batch-size", "2"])
    out = capsys.readouterr().out
    assert "timed on a GPU only" in out
    assert jax.default_backend() == "cpu"
