"""``benchmarks/bn_relu_pallas.py``: the device job that times the model's Pallas BatchNorm kernels, and
its BatchNorm choices (the model's kernels, XLA's reductions, the backward kernel alone) as the
step compiled for H100s has them. The kernels' numbers are checked in
tests/models/test_pallas_batch_norm.py."""

from __future__ import annotations

import jax
import pytest

from benchmarks import bn_relu_pallas
from tests.conftest import require_cuda_plugin


@pytest.mark.slow
def test_compiled_for_h100s_the_model_runs_the_kernels_and_moves_fewer_bytes_on_one_gpu_and_on_two():
    """``gpu_compile_report [--bn-relu xla|pallas] [--gpus 2]`` (compiled for the H100, no GPU
    needed): ResNet-18's step as the model has it runs one Triton kernel per BatchNorm's
    statistics (20) and one per inner BatchNorm + ReLU's backward (bn1 of its 8 blocks); with
    XLA's reductions it runs none and moves more bytes at the same peak memory. With the
    batch split over two GPUs nothing is gathered, and the model still moves fewer bytes per
    GPU."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report

    for gpus in (1, 2):
        xla, xla_hlo = compile_report("resnet18", 16, 64, "bfloat16", gpus=gpus, bn_relu="xla")
        assert xla_hlo.count('custom_call_target="__gpu$xla.gpu.triton"') == 0
        for choice, kernels in (("pallas", 8), ("model", 8 + 20)):
            ours, hlo = compile_report("resnet18", 16, 64, "bfloat16", gpus=gpus, bn_relu=choice)
            assert (ours["gpus"], ours["bn_relu"]) == (gpus, choice)
            assert hlo.count('custom_call_target="__gpu$xla.gpu.triton"') == kernels
            assert ours["traffic_gib"] < xla["traffic_gib"], (gpus, choice, ours["traffic_gib"], xla["traffic_gib"])
            assert ours["peak_gib"] <= xla["peak_gib"] * 1.001
            assert "all-gather" not in hlo


def test_a_batch_norm_choice_is_undone_after_its_block_and_an_unknown_one_refused():
    from resnet_jax.models import layers, pallas_batch_norm

    before = layers._batch_norm_train, pallas_batch_norm.batch_norm_train
    for choice in bn_relu_pallas.CHOICES:
        with bn_relu_pallas.batch_norm(choice):
            during = layers._batch_norm_train, pallas_batch_norm.batch_norm_train
            assert (during == before) == (choice == "model")
        assert (layers._batch_norm_train, pallas_batch_norm.batch_norm_train) == before
    with pytest.raises(ValueError, match="'model', 'xla', 'pallas'"):
        with bn_relu_pallas.batch_norm("pallas-stats"):
            pass


def test_the_device_job_reports_a_failing_choice_and_times_the_rest(monkeypatch, capsys):
    """``main`` (the bn-relu/ device job): a choice that raises gets an error row, and the others
    and the statistics are still timed; off a GPU every choice computes the same numbers."""
    import json

    real_step = bn_relu_pallas.bn_relu_step

    def step(impl):
        if impl == "pallas":
            def broken(*args):
                raise RuntimeError("Triton refused the kernel")
            return broken
        return real_step(impl)

    monkeypatch.setattr(bn_relu_pallas, "bn_relu_step", step)
    monkeypatch.setattr(bn_relu_pallas, "resnet50_inner_shapes", lambda batch: [(batch, 4, 4, 16)])
    monkeypatch.setattr(bn_relu_pallas, "resnet50_batch_norm_shapes", lambda batch: [(batch, 4, 4, 32)])
    bn_relu_pallas.main(["--batch-size", "2", "--repeats", "1", "--inner", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["part"], r["impl"], "error" in r) for r in rows] == [
        ("bn_relu", "model", False), ("bn_relu", "xla", False), ("bn_relu", "pallas", True),
        ("moments", "pallas", False), ("moments", "xla", False)]
    assert "Triton refused the kernel" in rows[2]["error"]
    assert jax.default_backend() != "cpu" or rows[1]["max_rel_diff_vs_model"] < 1e-6


def test_a_block_spec_sets_the_kernels_parameters_for_its_block_only_and_a_bad_one_is_refused():
    """``kernel_blocks('64x8x4x3x32')`` makes the kernels traced inside it use 64-row, 32-channel
    blocks (a (1024, 256) input: 16 x 8 partial sums instead of the default's 2 x 2), and the sums
    still match plain float64 ones; a minimum instance count shrinks the row blocks until it
    is met; the defaults are back after the block."""
    import numpy as np

    from resnet_jax.models import pallas_batch_norm as pbn

    defaults = (pbn.BLOCK_ROWS, pbn.SUB_ROWS, pbn.NUM_WARPS, pbn.NUM_STAGES, pbn.BLOCK_CHANNELS)
    assert bn_relu_pallas.parse_blocks("512x32x4") == {"BLOCK_ROWS": 512, "SUB_ROWS": 32, "NUM_WARPS": 4}
    x = jax.random.normal(jax.random.key(0), (1024, 256))
    seen = []
    real = pbn.pl.pallas_call

    def spy(*args, grid, **kwargs):
        seen.append(grid)
        return real(*args, grid=grid, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pbn.pl, "pallas_call", spy)
        with bn_relu_pallas.kernel_blocks("64x8x4x3x32"):
            assert (pbn.BLOCK_ROWS, pbn.SUB_ROWS, pbn.NUM_WARPS, pbn.NUM_STAGES, pbn.BLOCK_CHANNELS) == (64, 8, 4, 3, 32)
            sums = pbn.moment_sums(x, interpret=True)
        pbn.moment_sums(x, interpret=True)
        # at least 64 instances: the default's 512-row blocks halve to 32 rows (32 x 2 blocks)
        with bn_relu_pallas.kernel_blocks("512x32x4x2x128x64"):
            small_blocks = pbn.moment_sums(x, interpret=True)
    assert seen == [(16, 8), (2, 2), (32, 2)]
    x64 = np.asarray(x, np.float64)
    for got in (sums, small_blocks):
        np.testing.assert_allclose(np.asarray(got[0]), x64.sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got[1]), (x64 * x64).sum(0), rtol=1e-5)
    assert (pbn.BLOCK_ROWS, pbn.SUB_ROWS, pbn.NUM_WARPS, pbn.NUM_STAGES, pbn.BLOCK_CHANNELS) == defaults
    assert bn_relu_pallas.parse_blocks("512x32x4x2x128x0")["MIN_PROGRAMS"] == 0
    for bad in ("512x32", "512x32x4x2x128x1x1", "512xax4", "512x0x4", "512x32x4x2x128x-1"):
        with pytest.raises(ValueError, match="ROWSxSUB_ROWSxWARPS"):
            bn_relu_pallas.parse_blocks(bad)
