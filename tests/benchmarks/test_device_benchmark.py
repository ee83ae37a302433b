"""benchmarks/device_benchmark.py: issue 6's device measurements in priority order within a call's time."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import candidates as cand
from benchmarks import device_benchmark as db
from benchmarks.device_benchmark import Job, plan, run_jobs, select, summary


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_jobs_run_in_order_within_the_budget_and_every_job_is_accounted_for(tmp_path, monkeypatch):
    """Budget 8 s: a job that does not fit its estimate is skipped and a shorter one after it
    still runs; a failing job is reported failed; a job past its own limit is killed there and
    the next one runs; a job still running at the deadline is killed with its whole process
    group (a child holding its output open included), and the result it printed before stays."""
    monkeypatch.setattr(db, "RESERVE_S", 0.0)
    jobs = [
        Job("first/a@1", 1, _py('print("warming up"); print(\'{"images_per_s": 10}\'); print("{not json")')),
        Job("second/too-long@1", 100, _py("raise SystemExit('must not run')")),
        Job("third/b@1", 1, _py("raise SystemExit(3)")),
        Job("guess/g@1", 1, _py('import time; print(\'{"partial": 1}\', flush=True); time.sleep(60)'), limit_s=2),
        Job("fourth/c@1", 1, ("bash", "-c", "echo '{\"xla\": 1}'; sleep 60 & sleep 60")),
        Job("fifth/d@1", 1, _py("print('{\"late\": 1}')")),
    ]
    echoed = []
    start = time.monotonic()
    outcomes = run_jobs(jobs, tmp_path, budget_s=8, echo=echoed.append)
    took = time.monotonic() - start

    assert [(o.id, o.status) for o in outcomes] == [
        ("first/a@1", "done"), ("second/too-long@1", "skipped"), ("third/b@1", "failed"),
        ("guess/g@1", "killed"), ("fourth/c@1", "killed"), ("fifth/d@1", "skipped")]
    assert took < 15, "the killed job's background child must not keep run_jobs waiting"
    assert "needs ~100 s" in outcomes[1].reason and "exit status 3" in outcomes[2].reason
    assert "limit of 2 s" in outcomes[3].reason and 1.5 < outcomes[3].seconds < 5
    assert "at the deadline" in outcomes[4].reason
    # each JSON object printed on a line of its own, tagged with its job; other lines only logged
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == [{"job": "first/a@1", "images_per_s": 10}, {"job": "guess/g@1", "partial": 1},
                    {"job": "fourth/c@1", "xla": 1}]
    log = (tmp_path / "log.txt").read_text()
    assert "warming up" in log and "{not json" in log and "must not run" not in log
    assert [json.loads(line)["status"] for line in (tmp_path / "jobs.jsonl").read_text().splitlines()] == [
        o.status for o in outcomes]
    assert any("killed" in line for line in echoed)

    # the summary names every job not done, in an --only line that selects exactly those jobs
    (owed_line,) = [line for line in summary(rows, outcomes).splitlines() if line.startswith("owed")]
    assert owed_line.startswith("owed (5): bash benchmarks/device_benchmark.sh --only ")
    only = owed_line.split("--only ")[1]
    assert [j.id for j in select(jobs, only=only)] == [o.id for o in outcomes if o.status != "done"]


def test_a_dry_run_without_job_limits_lets_a_job_run_past_its_limit_up_to_the_deadline(tmp_path, monkeypatch):
    """--no-job-limits (a CPU dry run, whose compiles are slower than the device's): a job past
    its own limit of 1 s runs on and ends done; the budget's deadline still kills one that hangs."""
    monkeypatch.setattr(db, "RESERVE_S", 0.0)
    jobs = [Job("slow/a@1", 1, _py('import time; time.sleep(2.5); print(\'{"late": 1}\')'), limit_s=1),
            Job("hangs/b@1", 1, _py("import time; time.sleep(60)"), limit_s=1)]
    outcomes = run_jobs(jobs, tmp_path, budget_s=6, echo=lambda line: None, job_limits=False)
    assert [(o.id, o.status) for o in outcomes] == [("slow/a@1", "done"), ("hangs/b@1", "killed")]
    assert outcomes[0].seconds > 2 and "at the deadline" in outcomes[1].reason
    assert (tmp_path / "results.jsonl").read_text().splitlines() == ['{"job": "slow/a@1", "late": 1}']


def test_the_headline_peers_come_first_then_the_choice_and_our_rows_and_the_longest_search_last():
    jobs = plan(torchvision_models={"resnet50", "resnet18", "resnet101"},
                flax_models={"resnet50", "resnet18", "resnet101"})
    ids = [j.id for j in jobs]
    assert ids[:7] == ["torchvision/resnet50@224", "flax/resnet50@224", "candidates/resnet50@224",
                       "ours/resnet50@224", "ours/resnet18@224", "ours/resnet101@224", "ours/resnetrs50@160"]
    assert ids[7:11] == ["fused-conv/b256", "bn-relu/b256", "stem-variants/resnet50@224", "profile/resnet50@224"]
    assert ids[-1] == "max-batch/resnet50@224"
    assert len(set(ids)) == len(ids)
    # the first call's budget (570 s less the reserve, the device probe's 10 s included) holds
    # ResNet-50's comparison (both peers, the choice and our row) with the choice made in the same
    # call; with thirteen candidates to time, our other rows (ResNet-18 by 10 s) spill into the owed
    # line, as the other models' peers do anyway (they come after the diagnostics)
    assert 10 + sum(j.estimate_s for j in jobs[:4]) <= 570 - db.RESERVE_S
    # every resnet-jax command runs with the choice (auto: the candidates job's), the trainer's too
    cli = [j for j in jobs if "resnet_jax.cli" in " ".join(j.argv) or "candidates.py apply" in " ".join(j.argv)]
    assert {j.id.split("/")[0] for j in cli} >= {"ours", "profile", "trainer", "dispatch-4", "xla-1", "max-batch"}
    assert all("resnet_jax.cli" not in " ".join(j.argv) for j in cli)
    assert all("candidates.py apply --choice auto --" in " ".join(j.argv) for j in cli)
    # a choice given: every command runs with it, and no candidates job
    fixed = plan(choice="fused-conv+fused-stem")
    assert "candidates/resnet50@224" not in [j.id for j in fixed]
    assert "--choice fused-conv+fused-stem --" in " ".join(next(j for j in fixed if j.id.startswith("ours/")).argv)
    # the candidates' jobs, whose estimates are guesses, stop at a limit above their estimate
    limited = {j.id: (j.estimate_s, j.limit_s) for j in jobs if j.limit_s}
    assert set(limited) == {"candidates/resnet50@224", "stem-variants/resnet50@224", "fused-conv/b256",
                            "bn-relu/b256"}
    assert all(estimate < limit for estimate, limit in limited.values())
    # ResNet-RS is timed with its recipe's step (EMA, label smoothing, dropout), as it trains
    rs = next(j for j in jobs if j.id == "ours/resnetrs50@160")
    assert "configs/resnet_rs.py:scaled-50-160" in rs.argv
    # no peer job for a model the peer cannot run here (torchvision without CUDA, no ResNet-RS)
    assert not [i for i in ids if i.startswith(("torchvision", "flax")) and "resnetrs" in i]
    assert not [j for j in plan() if j.id.startswith(("torchvision", "flax"))]
    # a bare kind selects all its jobs; a pattern a subset; an unknown id is an error, not an empty run
    assert [j.id for j in select(jobs, only="ours")] == ids[3:7]
    assert [j.id for j in select(jobs, only="*/resnet18@224", skip="flax")] == [
        "ours/resnet18@224", "torchvision/resnet18@224"]
    with pytest.raises(SystemExit, match="matches no job"):
        select(jobs, only="ours/resnet51@224")


@pytest.mark.slow
def test_a_cpu_dry_run_of_every_job_returns_what_a_device_call_can_bring_back(tmp_path):
    """The device call's own commands, shrunk (ResNet-18 at 32px, batch 8): every job that can
    run on a CPU ends done, and $OUT holds no more than the 8 plain files, named in letters,
    digits, '.', '_' and '-', that a device call returns. Without the jobs' own limits, which
    are the device's, and with a budget far above the ~400 s the run takes alone on 2 cores: CI's
    machine, with the other test worker busy, took over 340 s for the ten candidate compiles that
    take 112 s alone, and a job whose estimate no longer fits the time left would be skipped."""
    out = tmp_path / "out"
    script = Path(db.__file__).resolve()
    run = subprocess.run(  # from another directory: the runner finds the repository itself
        [sys.executable, str(script), "--out", str(out), "--models", "resnet18:32",
         "--batch-size", "8", "--steps", "5", "--xla-variants=--xla_gpu_enable_command_buffer=",
         "--dispatch-variants", "2", "--budget-s", "2400", "--no-job-limits"],
        capture_output=True, text=True, timeout=2700, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent.parent),
                                                                       os.environ.get("PYTHONPATH")]))})
    assert (out / "jobs.jsonl").exists(), run.stderr[-3000:]
    statuses = {json.loads(line)["id"]: json.loads(line)["status"]
                for line in (out / "jobs.jsonl").read_text().splitlines()}
    # the batch search needs a device memory limit: on a CPU it is refused at once, and owed
    assert statuses.pop("max-batch/resnet18@32") == "failed"
    assert set(statuses.values()) == {"done"}, (statuses, run.stdout[-3000:])
    assert set(statuses) == {"device/-", "ours/resnet18@32", "flax/resnet18@32", "candidates/resnet18@32",
                             "stem-variants/resnet18@32",
                             "fused-conv/b8", "bn-relu/b8", "profile/resnet18@32",
                             "trainer/resnet18@32", "dispatch-2/resnet18@32", "xla-1/resnet18@32",
                             "compile-report/resnet18@32"}
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)
    assert {"results.jsonl", "jobs.jsonl", "log.txt", "summary.txt", "kernel_bandwidth.txt", "profile.tar.gz",
            "compile_report.tar.gz"} <= set(files)

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ours = next(r for r in rows if r["job"] == "ours/resnet18@32" and "images_per_second" in r)
    flax = next(r for r in rows if r["job"] == "flax/resnet18@32")
    assert ours["batch_size"] == flax["batch_size"] == 8
    # the trainer job brings its bare step and the training loop's own log windows
    trainer = [r for r in rows if r["job"] == "trainer/resnet18@32"]
    assert any("config" in r for r in trainer) and any(r.get("split") == "train" for r in trainer)
    text = (out / "summary.txt").read_text()
    row = next(line for line in text.splitlines() if line.startswith("resnet18"))
    assert f"{ours['images_per_second'] / flax['images_per_s']:.2f}" in row.split()
    # the candidates job's choice (on a CPU, whichever the noise favours): every resnet-jax job
    # after it ran with it, and the next call is told to
    (choice,) = [r["candidates"] for r in rows if r["job"].startswith("candidates/") and r.get("final")]
    ran_with = {r["job"]: r["candidates"] for r in rows if r.get("part") == "candidates"}
    assert set(ran_with) >= {"ours/resnet18@32", "trainer/resnet18@32", "dispatch-2/resnet18@32",
                             "xla-1/resnet18@32", "max-batch/resnet18@32"}
    assert set(ran_with.values()) == {choice}
    assert f"candidates chosen: {choice} (" in text
    # the model's step and one run per candidate (fused-bn3 with fused-conv where that was not kept)
    assert sum(line.startswith("resnet18@32 step + ") for line in text.splitlines()) == 1 + len(cand.CANDIDATES)
    assert f"owed (1): bash benchmarks/device_benchmark.sh --candidates {choice} --only max-batch/resnet18@32" in text
    # the stem candidates: one summary line each, the current kernels at 1.00x; then the whole
    # step six ways: the model's own first, with the candidate pool, each GPU choice undone,
    # then all three undone
    stem = [line for line in text.splitlines() if line.startswith("stem ")]
    # (the kernels: 5 convolutions, 4 pools, the training BatchNorm + pool + ReLU as layers and fused)
    assert len(stem) == 11 + 6 and sum("(1.00x" in line for line in stem) == 3, stem
    assert "stem bn_pool_relu_train layers @32" in stem[9] and "stem bn_pool_relu_train fused @32" in stem[10]
    assert "stem in the resnet18 step, conv model's, pool model's, BatchNorm model" in stem[11]
    assert "(1.000x" in stem[11] and "conv model's, pool planes, BatchNorm model" in stem[12]
    assert all("; compiled in " in line for line in stem[11:])  # with and without the kernels: their compile cost
    assert "conv direct, pool slices, BatchNorm xla" in stem[-1]
    # the BatchNorm + ReLU alone: the model's, XLA's and the backward kernel alone at each of the 4 inner
    # shapes; the statistics, Pallas and XLA, at each of the 9 BatchNorm shapes (the
    # kernels' block sizes are timed on a GPU only)
    bn_relu = [line for line in text.splitlines() if line.startswith("BatchNorm+ReLU (")]
    assert len(bn_relu) == 12 and sum(" pallas:" in line for line in bn_relu) == 4, bn_relu
    stats = [line for line in text.splitlines() if line.startswith("BatchNorm statistics (")]
    assert len(stats) == 18 and sum(" pallas:" in line for line in stats) == 9, stats
    # then the whole step with the kernels' default blocks and with the small ones' rows shrunk
    blocks = [line for line in text.splitlines() if "step with the BatchNorm kernels' blocks" in line]
    assert [line.split("blocks ")[1].split(":")[0] for line in blocks] == [
        "default", "512x32x4x2x128x528", "512x32x4x2x128x1056"]
    assert "(1.000x the default blocks" in blocks[0]
    assert run.returncode == 1  # not everything done: the call says so


def test_a_candidate_kernel_that_fails_on_the_device_is_reported_not_dropped():
    """bn_relu_pallas.py and stem_variants.py print an error row for a candidate that fails to
    compile or run and time the rest; the summary shows the error beside the timings that
    did come back."""
    rows = [
        {"job": "bn-relu/b256", "part": "bn_relu", "impl": "pallas", "shape": [256, 56, 56, 64],
         "error": "TritonError: something the device's Triton refused"},
        {"job": "bn-relu/b256", "part": "moments", "impl": "pallas", "shape": [256, 56, 56, 256], "ms": 0.1,
         "gb_per_s": 4112, "max_rel_diff_vs_xla": 1e-6},
        {"job": "bn-relu/b256", "part": "grad_sums_kernel", "blocks": "1024x32x4", "error": "out of resources"},
        {"job": "bn-relu/b256", "part": "moments_kernel", "blocks": "512x32x8", "shape": [3211264, 64], "ms": 0.15,
         "gb_per_s": 2741},
        {"job": "stem-variants/resnet50@224", "part": "train_step", "model": "resnet50", "conv": "direct",
         "pool": "model's", "bn_relu": "xla", "error": "RuntimeError: no kernel image"},
    ]
    text = summary(rows, [db.Outcome("bn-relu/b256", "done", 60.0, 70.0)])
    assert ("stem in the resnet50 step, conv direct, pool model's, BatchNorm xla: "
            "failed: RuntimeError: no kernel image") in text
    assert "BatchNorm kernel bn_relu pallas (256, 56, 56, 64) failed: TritonError" in text
    assert "BatchNorm statistics (256, 56, 56, 256) pallas: 0.100 ms, 4112 GB/s" in text
    assert "BatchNorm kernel grad_sums_kernel 1024x32x4 () failed: out of resources" in text
    assert "BatchNorm moments kernel 512x32x8 on (3211264, 64): 0.150 ms, 2741 GB/s" in text


def test_the_summary_names_each_fused_conv_timing():
    """fused_conv_pallas.py's rows: the three block timings by what they time, a kernel alone,
    a whole step, and a candidate that failed."""
    rows = [
        {"job": "fused-conv/b256", "part": "block", "impl": "fused", "shape": [256, 56, 56, 64], "out_channels": 256,
         "ms": 1.5, "max_rel_diff_vs_model": 0.004},
        {"job": "fused-conv/b256", "part": "tail_block", "impl": "fused-bn3", "shape": [256, 56, 56, 64],
         "out_channels": 256, "ms": 2.5},
        {"job": "fused-conv/b256", "part": "conv1_block", "impl": "model", "shape": [256, 56, 56, 256],
         "out_channels": 64, "ms": 1.25},
        {"job": "fused-conv/b256", "part": "forward_kernel", "blocks": "128x128x64x8x2", "shape": [802816, 64, 256],
         "ms": 0.5, "gb_per_s": 2100, "tflop_per_s": 53},
        {"job": "fused-conv/b256", "part": "train_step", "model": "resnet50", "bn_relu": "fused-all", "pool": "planes",
         "images_per_second": 7000.0, "vs_model": 1.08, "peak_memory_gib": 9.5, "max_loss_diff_vs_model": 0.01,
         "compile_seconds": 21.0},
        {"job": "fused-conv/b256", "part": "tail_block", "impl": "fused", "shape": [256, 7, 7, 512],
         "error": "TritonError: out of shared memory"},
    ]
    text = summary(rows, [db.Outcome("fused-conv/b256", "done", 180.0, 195.0)])
    assert ("bn2+ReLU+conv3 (256, 56, 56, 64) -> 256 fused: 1.500 ms forward+backward "
            "(max rel. diff 4.0e-03 vs the model's)") in text
    assert "bn2+ReLU+conv3+bn3+add+ReLU (256, 56, 56, 64) -> 256 fused-bn3: 2.500 ms forward+backward" in text
    assert "conv1+bn1+ReLU (256, 56, 56, 256) -> 64 model: 1.250 ms forward+backward" in text
    assert "fused conv forward kernel 128x128x64x8x2 on (802816, 64, 256): 0.500 ms, 2100 GB/s, 53 TFLOP/s" in text
    assert "resnet50 step, BatchNorm fused-all, pool planes: 7000 img/s (1.080x the model's own" in text
    assert "fused conv tail_block fused (256, 7, 7, 512) failed: TritonError" in text


def test_the_summary_says_what_was_chosen_what_each_row_ran_with_and_passes_the_choice_on():
    """The candidates job's rows (kept, not kept, tried with what it builds on), the choice,
    the line each resnet-jax job printed first, and an owed line that carries the choice (and
    not the candidates job, which a call with a choice does not run)."""
    step = {"job": "candidates/resnet50@224", "part": "train_step", "peak_memory_gib": 9.5, "vs_kept": 1.0}
    rows = [
        {**step, "candidates": "none", "trying": "none", "images_per_second": 6490.0, "vs_model": 1.0,
         "max_loss_diff_vs_model": 0.0, "kept": True},
        {"job": "candidates/resnet50@224", "part": "choice", "candidates": "none", "vs_model": 1.0, "final": False},
        {**step, "candidates": "fused-conv", "trying": "fused-conv", "images_per_second": 6500.0, "vs_model": 1.0015,
         "vs_kept": 1.0015, "max_loss_diff_vs_model": 0.004, "kept": False, "why": "+0.15% on what was kept, under the 0.5% asked"},
        {**step, "candidates": "fused-conv+fused-bn3", "trying": "fused-bn3", "with": "fused-conv",
         "images_per_second": 6800.0, "vs_model": 1.0478, "vs_kept": 1.0478, "max_loss_diff_vs_model": 0.006, "kept": True},
        {**step, "candidates": "fused-conv+fused-bn3+fused-conv1", "trying": "fused-conv1", "kept": False,
         "error": "TritonError: out of shared memory"},
        {"job": "candidates/resnet50@224", "part": "choice", "candidates": "fused-conv+fused-bn3", "vs_model": 1.0478,
         "images_per_second": 6800.0, "final": True},
        {"job": "ours/resnet50@224", "part": "candidates", "candidates": "fused-conv+fused-bn3",
         "source": "candidates/resnet50@224's final choice (1.048x the model's step there)"},
        {"job": "ours/resnet50@224", "model": "resnet50", "image_size": 224, "batch_size": 256,
         "images_per_second": 6790.0, "images_per_second_min": 6700.0, "images_per_second_max": 6800.0, "mfu": 0.5,
         "peak_memory_gib": 9.4, "compile_seconds": 24.0},
    ]
    outcomes = [db.Outcome("candidates/resnet50@224", "killed", 230.0, 160.0, "ran past its limit of 230 s"),
                db.Outcome("ours/resnet50@224", "done", 44.0, 45.0),
                db.Outcome("ours/resnet18@224", "skipped", 0.0, 25.0)]
    text = summary(rows, outcomes)
    assert ("candidates on: fused-conv+fused-bn3 in ours/resnet50@224 (candidates/resnet50@224's final choice "
            "(1.048x the model's step there))") in text
    assert "resnet50@224 step + fused-conv: 6500 img/s (1.002x the model's, 1.002x what was kept; peak 9.5 GiB" in text
    assert "not kept, +0.15% on what was kept, under the 0.5% asked" in text
    assert "resnet50@224 step + fused-bn3 with fused-conv: 6800 img/s (1.048x the model's" in text
    assert "candidate fused-conv1 not run: TritonError: out of shared memory" in text
    assert "candidates chosen: fused-conv+fused-bn3 (1.048x the model's step)" in text
    # the table holds the benchmark row alone, not the line apply printed before it
    assert text.splitlines()[0].startswith("model") and text.splitlines()[1].startswith("resnet50      224")
    assert not text.splitlines()[2].startswith("resnet50 ")
    assert text.splitlines()[-1] == ("owed (1): bash benchmarks/device_benchmark.sh --candidates fused-conv+fused-bn3 "
                                     "--only ours/resnet18@224")
    # no choice made and none given: the owed line runs the candidates job again
    no_choice = summary([r for r in rows if r["job"] != "candidates/resnet50@224"], outcomes)
    assert no_choice.splitlines()[-1] == ("owed (2): bash benchmarks/device_benchmark.sh "
                                          "--only candidates/resnet50@224,ours/resnet18@224")
    # a choice given to the call is passed on
    given = summary([], [db.Outcome("ours/resnet18@224", "skipped", 0.0, 25.0)], choice="fused-stem")
    assert given.splitlines()[-1] == "owed (1): bash benchmarks/device_benchmark.sh --candidates fused-stem --only ours/resnet18@224"
