"""benchmarks/candidates.py: the device's greedy choice among the changes built but off by
default, and the resnet-jax commands run with it.

The choice's logic is checked with a stand-in ``measure`` whose figures are given, so each
rule (the gain asked for, the loss tolerance, NaN, a failing candidate, one that builds on
another) is decided by numbers the test chose. That each candidate computes the model's
function is the job of tests/models/test_pallas_fused_conv.py and test_modules.py.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import candidates as cand
from resnet_jax.models import blocks, layers, pallas_batch_norm, pallas_fused_conv
from resnet_jax.train import step


def _flags() -> tuple:
    return (blocks.FUSE_BN2_CONV3, blocks.FUSE_BN3, blocks.FUSE_CONV1_BN1, layers.FUSE_STEM_POOL,
            pallas_batch_norm.MIN_PROGRAMS, pallas_fused_conv.INPUT_GRAD_SUMS, layers.FUSE_SHORTCUT,
            pallas_fused_conv.GRAM_BACKWARD, blocks.FUSE_RESIDUAL, blocks.FUSE_PROJECTION, pallas_fused_conv.BLOCK_M,
            pallas_fused_conv.NUM_WARPS, step.GRADS_IN_PARAM_LAYOUT, step.DONATE_STATE)


def test_a_choice_spec_names_known_candidates_once_each_with_what_they_build_on():
    assert cand.parse_choice("none") == cand.parse_choice("") == ()
    # written in any order, kept in the order they are tried; spec_of writes it back
    choice = cand.parse_choice("fused-stem+fused-bn3+fused-conv")
    assert [c.name for c in choice] == ["fused-conv", "fused-bn3", "fused-stem"]
    assert cand.spec_of(choice) == "fused-conv+fused-bn3+fused-stem" and cand.spec_of(()) == "none"
    with pytest.raises(ValueError, match="unknown candidate.*'fused-conv3'.*known: fused-conv, "):
        cand.parse_choice("fused-conv3")
    with pytest.raises(ValueError, match="twice"):
        cand.parse_choice("fused-stem+fused-stem")
    with pytest.raises(ValueError, match="'fused-bn3' builds on 'fused-conv'"):
        cand.parse_choice("fused-bn3")
    with pytest.raises(ValueError, match="'grad-sums' builds on 'fused-bn3'"):
        cand.parse_choice("fused-conv+grad-sums")
    assert [c.name for c in cand.with_requirements(cand.BY_NAME["grad-sums"])] == [
        "fused-conv", "fused-bn3", "grad-sums"]
    with pytest.raises(ValueError, match="'gram-backward' builds on 'fused-bn3'"):
        cand.parse_choice("fused-conv+fused-shortcut+gram-backward")
    assert [c.name for c in cand.with_requirements(cand.BY_NAME["gram-backward"])] == [
        "fused-conv", "fused-bn3", "gram-backward"]
    assert [c.name for c in cand.with_requirements(cand.BY_NAME["fused-residual"])] == [
        "fused-conv", "fused-bn3", "fused-residual"]
    assert [c.name for c in cand.with_requirements(cand.BY_NAME["fused-projection"])] == [
        "fused-conv", "fused-bn3", "fused-residual", "fused-projection"]
    with pytest.raises(ValueError, match="'small-tiles' builds on 'fused-conv'"):
        cand.parse_choice("small-tiles")


def test_applied_switches_each_candidate_on_and_restores_the_model_even_after_an_error():
    before = _flags()
    # the defaults this script exists to change
    assert before == (False, False, False, False, 0, False, False, False, False, False, 128, 8, False, True)
    with cand.applied(cand.parse_choice("+".join(cand.BY_NAME))):
        assert _flags() == (True, True, True, True, 528, True, True, True, True, True, 64, 4, True, False)
    assert _flags() == before
    with pytest.raises(RuntimeError, match="compile failed"), cand.applied(cand.parse_choice("fused-stem")):
        assert layers.FUSE_STEM_POOL and not blocks.FUSE_BN2_CONV3
        raise RuntimeError("compile failed")
    assert _flags() == before


def _measure(figures: dict[str, tuple[float, list[float]] | Exception], seen: list) -> callable:
    """measure(choice): the images/s and losses given for the choice's last candidate ("none": the model)."""

    def measure(choice):
        seen.append(cand.spec_of(choice))
        result = figures[choice[-1].name if choice else "none"]
        if isinstance(result, Exception):
            raise result
        images_per_second, losses = result
        return {"images_per_second": images_per_second, "losses": losses, "peak_memory_gib": 9.0,
                "compiled_memory_gib": 9.5, "compile_seconds": 20.0}

    return measure


def test_the_greedy_choice_keeps_each_candidate_that_gains_enough_on_what_was_kept():
    """Model 1000 img/s. fused-conv 1010 (+1.0%: kept); small-tiles 1012 (+0.2% on 1010: not
    kept); fused-bn3 1014 (+0.4% on 1010: not kept, though faster than the model); grad-sums,
    with fused-bn3, 1012 (not kept); gram-backward, with fused-bn3, 1013, fused-residual 1011
    and fused-projection, with fused-bn3 and fused-residual, 1012 (none kept); fused-conv1
    1050 with a loss 0.04 off (within 0.05: kept); fused-shortcut 1055 (+0.48% on 1050: not
    kept); fused-stem 1100 but a loss 0.06 off (not kept); min-programs NaN losses
    (not kept); grad-layout 1052 (+0.19%: not kept); keep-state 1060 (+0.95% on 1050: kept)."""
    base = [6.9, 6.8, 6.7]
    seen, rows = [], []
    kept = cand.select(_measure({
        "none": (1000.0, base),
        "fused-conv": (1010.0, [6.9, 6.8, 6.7]),
        "small-tiles": (1012.0, base),
        "fused-bn3": (1014.0, base),
        "grad-sums": (1012.0, base),
        "gram-backward": (1013.0, base),
        "fused-residual": (1011.0, base),
        "fused-projection": (1012.0, base),
        "fused-conv1": (1050.0, [6.9, 6.84, 6.7]),
        "fused-shortcut": (1055.0, base),
        "fused-stem": (1100.0, [6.9, 6.8, 6.76]),
        "min-programs": (2000.0, [6.9, math.nan, 6.7]),
        "grad-layout": (1052.0, base),
        "keep-state": (1060.0, base),
    }, seen), emit=rows.append)
    assert cand.spec_of(kept) == "fused-conv+fused-conv1+keep-state"
    # each candidate is measured on top of what was kept before it
    assert seen == ["none", "fused-conv", "fused-conv+small-tiles", "fused-conv+fused-bn3",
                    "fused-conv+fused-bn3+grad-sums",
                    "fused-conv+fused-bn3+gram-backward", "fused-conv+fused-bn3+fused-residual",
                    "fused-conv+fused-bn3+fused-residual+fused-projection", "fused-conv+fused-conv1",
                    "fused-conv+fused-conv1+fused-shortcut", "fused-conv+fused-conv1+fused-stem",
                    "fused-conv+fused-conv1+min-programs", "fused-conv+fused-conv1+grad-layout",
                    "fused-conv+fused-conv1+keep-state"]
    steps = [r for r in rows if r["part"] == "train_step"]
    assert [r["kept"] for r in steps] == [True, True, False, False, False, False, False, False, True, False, False,
                                          False, False, True]
    assert [r["vs_model"] for r in steps] == [1.0, 1.01, 1.012, 1.014, 1.012, 1.013, 1.011, 1.012, 1.05, 1.055, 1.1,
                                              2.0, 1.052, 1.06]
    assert steps[2]["trying"] == "small-tiles" and "with" not in steps[2]  # on top of fused-conv, kept
    assert steps[3]["vs_kept"] == pytest.approx(1014 / 1010, abs=1e-4) and "under the 0.5% asked" in steps[3]["why"]
    # what they build on, not kept, tried with them
    assert steps[4]["with"] == steps[5]["with"] == steps[6]["with"] == "fused-bn3"
    assert steps[7]["with"] == "fused-bn3+fused-residual"
    assert steps[8]["max_loss_diff_vs_model"] == pytest.approx(0.04)
    assert "under the 0.5% asked" in steps[9]["why"]
    assert "loss differs from the model's by 0.06 > 0.05" in steps[10]["why"]
    assert "by nan" in steps[11]["why"]
    # a choice after every run, the last one final: a job killed part-way leaves whole measurements
    choices = [r for r in rows if r["part"] == "choice"]
    assert [c["candidates"] for c in choices] == ["none", *["fused-conv"] * 7, *["fused-conv+fused-conv1"] * 5,
                                                  *["fused-conv+fused-conv1+keep-state"] * 2]
    assert [c["final"] for c in choices] == [False] * 14 + [True]
    assert choices[-1]["vs_model"] == 1.06 and choices[-1]["images_per_second"] == 1060.0
    json.dumps(rows)  # every row is a JSON line


def test_a_candidate_that_builds_on_one_not_kept_is_tried_with_it_and_may_bring_it_in():
    """fused-conv alone +0.2% (not kept); small-tiles with it +0.3% (neither kept); fused-bn3 with
    fused-conv +4%: both kept. Then grad-sums,
    gram-backward, fused-residual, fused-projection (with fused-residual) and fused-conv1 on top
    of both."""
    seen, rows = [], []
    kept = cand.select(_measure({
        "none": (1000.0, [2.0]), "fused-conv": (1002.0, [2.0]), "small-tiles": (1003.0, [2.0]),
        "fused-bn3": (1040.0, [2.0]),
        "grad-sums": (1041.0, [2.0]), "gram-backward": (1041.0, [2.0]), "fused-residual": (1041.0, [2.0]),
        "fused-projection": (1041.0, [2.0]), "fused-conv1": (1041.0, [2.0]),
        "fused-shortcut": (1000.0, [2.0]),
        "fused-stem": (1000.0, [2.0]),
        "min-programs": (1000.0, [2.0]),
        "grad-layout": (1000.0, [2.0]),
        "keep-state": (1000.0, [2.0]),
    }, seen), emit=rows.append)
    assert cand.spec_of(kept) == "fused-conv+fused-bn3"
    assert seen[:9] == ["none", "fused-conv", "fused-conv+small-tiles", "fused-conv+fused-bn3",
                        "fused-conv+fused-bn3+grad-sums",
                        "fused-conv+fused-bn3+gram-backward", "fused-conv+fused-bn3+fused-residual",
                        "fused-conv+fused-bn3+fused-residual+fused-projection", "fused-conv+fused-bn3+fused-conv1"]
    assert next(r for r in rows if r.get("trying") == "small-tiles")["with"] == "fused-conv"
    bundled = next(r for r in rows if r.get("trying") == "fused-bn3")
    assert bundled["with"] == "fused-conv" and bundled["kept"] and bundled["vs_kept"] == 1.04


def test_a_candidate_that_fails_is_a_row_one_built_on_it_is_not_run_and_the_models_failure_is_raised():
    seen, rows = [], []
    kept = cand.select(_measure({
        "none": (1000.0, [2.0]),
        "fused-conv": RuntimeError("Triton: out of shared memory"),
        "fused-conv1": (990.0, [2.0]),
        "fused-shortcut": (1000.0, [2.0]),
        "fused-stem": (1030.0, [2.0]),
        "min-programs": (1031.0, [2.0]),
        "grad-layout": (1030.0, [2.0]),
        "keep-state": (1030.0, [2.0]),
    }, seen), emit=rows.append)
    assert cand.spec_of(kept) == "fused-stem"
    assert not [s for s in seen if "fused-conv+" in s or "grad-sums" in s]
    by = {r["trying"]: r for r in rows if r["part"] == "train_step"}
    assert "out of shared memory" in by["fused-conv"]["error"] and not by["fused-conv"]["kept"]
    assert by["fused-bn3"]["why"] == by["small-tiles"]["why"] == "builds on fused-conv, which failed"
    assert by["grad-sums"]["why"] == "builds on fused-conv, fused-bn3, which failed"
    assert "-1.00% on what was kept" in by["fused-conv1"]["why"]
    assert rows[-1] == {"part": "choice", "candidates": "fused-stem", "images_per_second": 1030.0,
                        "vs_model": 1.03, "final": True}

    with pytest.raises(RuntimeError, match="no device"):
        cand.select(_measure({"none": RuntimeError("no device")}, []), emit=rows.append)


def test_apply_reads_the_last_choice_of_the_call_and_runs_the_command_with_it(tmp_path, monkeypatch, capsys):
    """The device runner's results.jsonl: the last choice row wins (a partial one too); no
    file or no choice there: the model as it is. The resnet-jax command runs with the
    candidates on and the model is restored after it."""
    seen = []

    def fake_cli_main(argv):
        seen.append((argv, _flags()))
        return 0

    from resnet_jax import cli

    monkeypatch.setattr(cli, "main", fake_cli_main)
    monkeypatch.setenv("OUT", str(tmp_path))
    before = _flags()
    args = ["--", "benchmark", "--json", "--model", "resnet50"]
    assert cand.main(["apply", *args]) == 0  # no results.jsonl yet
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        {"job": "candidates/resnet50@224", "part": "choice", "candidates": "fused-conv", "vs_model": 1.02,
         "final": False},
        {"job": "candidates/resnet50@224", "part": "train_step", "candidates": "fused-conv+fused-bn3"},
        {"job": "candidates/resnet50@224", "part": "choice", "candidates": "fused-conv+fused-bn3", "vs_model": 1.04,
         "final": False},
    ]) + "\n{not json\n")
    assert cand.main(["apply", "--choice", "auto", *args]) == 0
    assert cand.main(["apply", "--choice", "fused-stem", *args]) == 0
    assert [argv for argv, _ in seen] == [args[1:]] * 3
    assert [flags[:3] for _, flags in seen] == [(False, False, False), (True, True, False), (False, False, False)]
    assert seen[2][1][3] is True
    assert _flags() == before
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["candidates"] for p in printed] == ["none", "fused-conv+fused-bn3", "fused-stem"]
    assert "no choice in" in printed[0]["source"] and "the model as it is" in printed[0]["source"]
    assert printed[1]["source"] == "candidates/resnet50@224's partial choice (1.040x the model's step there)"

    with pytest.raises(SystemExit):
        cand.main(["apply", "--choice", "fused-bn3", *args])
    assert "'fused-bn3' builds on 'fused-conv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cand.main(["apply", "--choice", "none"])
    assert "give the resnet-jax command after --" in capsys.readouterr().err


@pytest.mark.slow
def test_select_on_a_small_bottleneck_network_runs_every_candidate_and_ends_with_the_choice(capsys):
    """The device job's own path on CPU (ResNet-26 at 32px, batch 8 over the 8 test devices, float32): the model's step and each
    candidate's, every loss within float32 rounding of the model's, and a final choice."""
    assert cand.main(["select", "--model", "resnet26", "--batch-size", "8", "--image-size", "32", "--dtype",
                      "float32", "--steps", "2", "--min-gain", "-1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [r for r in rows if r["part"] == "train_step"]
    # --min-gain -1 keeps every candidate that runs with the model's losses: all of them, each on top of the others
    assert [r["candidates"] for r in steps][-1] == "+".join(cand.BY_NAME)
    assert all(r["kept"] and r["max_loss_diff_vs_model"] < 1e-4 for r in steps), steps
    assert rows[-1]["final"] and rows[-1]["candidates"] == "+".join(cand.BY_NAME)


def test_the_compile_report_compiles_the_step_with_a_choice_given_or_the_calls_own(tmp_path, monkeypatch, capsys):
    """``gpu_compile_report --candidates`` (compiled for the H100 without one): with changes 9,
    11 and 12 the ResNet-26 step has their kernels and moves fewer bytes than the model's;
    ``auto`` reads the device job's choice from $OUT/results.jsonl; a bad spec is refused."""
    from tests.conftest import require_cuda_plugin

    require_cuda_plugin()
    from benchmarks.gpu_compile_report import main

    args = ["--model", "resnet26", "--batch-size", "8", "--image-size", "64", "--json"]
    hlo = tmp_path / "step.hlo.txt"
    assert main([*args, "--dump-hlo", str(hlo)]) == 0
    model = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert model["candidates"] == "none" and "affine_grad_matmul" not in hlo.read_text()
    (tmp_path / "results.jsonl").write_text(json.dumps(
        {"job": "candidates/resnet50@224", "part": "choice", "candidates": "fused-conv+fused-bn3+grad-sums",
         "final": True}) + "\n")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main([*args, "--candidates", "auto", "--dump-hlo", str(hlo)]) == 0
    fused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fused["candidates"] == "fused-conv+fused-bn3+grad-sums"
    text = hlo.read_text()
    assert "bn_relu_matmul_moments" in text and "affine_grad_matmul_relu_grad_sums" in text
    assert fused["traffic_gib"] < model["traffic_gib"]
    assert _flags()[:3] == (False, False, False)  # the model restored
    with pytest.raises(SystemExit):
        main([*args, "--candidates", "grad-sums"])
    assert "'grad-sums' builds on 'fused-bn3'" in capsys.readouterr().err
