"""Every device measurement issue 6 owes, most important first, within one device call's time.

A drawn task gets 15 minutes of device time in all, the machine's start included, and one
command may run 10 minutes: not enough for everything (estimates below, ~30 minutes).
So the measurements are jobs in priority order, and each call runs as many as its
``--budget-s`` allows:

1. ResNet-50 @224: torchvision (eager, torch.compile) and flax's plain ResNet, the peers of
   the README's headline row;
2. the ``candidates/`` job (``candidates.py select``): the whole ResNet-50 step as the model
   has it, then with each change built but off by default (changes 7-17, 19-21) added in turn, kept
   where it is faster; every ``resnet-jax`` job after it runs with that choice
   (``candidates.py apply``), so that the rows a winning candidate changes are measured in
   the same call, and the next call gets it with ``--candidates`` (the owed line says so);
3. ours for ResNet-50 (the headline row and its ratio), ResNet-18, ResNet-101 and
   ResNet-RS-50 @160 (its recipe's step; by the estimates the last three spill into the next
   call, as the other models' peers do);
4. the diagnostics of the candidates: the BatchNorms fused into the 1x1 convolutions alone
   and each kernel, the Pallas BatchNorm kernels alone and with more instances, then the
   stem's candidate kernels and the step with each of its GPU kernel choices undone
   (``fused_conv_pallas.py``, ``bn_relu_pallas.py``, ``stem_variants.py``);
5. a profile of the step (``kernel_bandwidth.py``: where its time goes); the trainer's
   whole loop against its bare step;
6. the other models' peers; steps per dispatch and XLA flag variants; the step compiled on
   the device; the largest batch that fits.

A job starts only if its estimate fits in the time left (a later, shorter one may still
run) and is killed at the deadline, or earlier at its own limit where its estimate is a
guess (the candidates' jobs), so that an overrun cannot take the rows after it. Nothing
is dropped silently: every job ends as done, failed, killed or skipped, in
``$OUT/jobs.jsonl`` and in the summary, which prints the ``--only`` line that runs the
rest in the next call. Each result line is written to
``$OUT/results.jsonl`` as soon as its job prints it, so a call cut short keeps what finished.

    here:       bash benchmarks/prepare_device.sh     # .whl/: ml-collections + the peer script
    on device:  run(command="bash benchmarks/device_benchmark.sh", carry=[".whl"], timeout_s=600)
    then at once, while the machine is warm (it goes back after 30 s idle), with the device time left:
                run(command="bash benchmarks/device_benchmark.sh --candidates ... --only ... --budget-s N",
                    carry=[".whl"])

``--list`` prints the plan with its estimates and exits; a CPU dry run of the whole path
(``--no-job-limits``: the limits are sized for the device, and a CPU's compiles of the ten
candidate steps take minutes longer; the ``--budget-s`` deadline still stops every job):
``bash benchmarks/device_benchmark.sh --models resnet18:32 --batch-size 8 --steps 10 --no-job-limits``.
$OUT holds at most 7 files (a device call returns 8): results.jsonl, jobs.jsonl, log.txt,
summary.txt, and kernel_bandwidth.txt, profile.tar.gz, compile_report.tar.gz when run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DEFAULT_MODELS = ("resnet50:224", "resnet18:224", "resnet101:224", "resnetrs50:160")
# Flags worth a timing (docs/performance.md): the scheduler, and command buffers (CUDA graphs) off,
# which says what launching the step's ~1,000 kernels one by one costs.
DEFAULT_XLA_VARIANTS = ("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_command_buffer=")
# The fused-conv job's block timings (benchmarks/fused_conv_pallas.py), as the summary names them.
FUSED_CONV_BLOCKS = {"block": "bn2+ReLU+conv3", "tail_block": "bn2+ReLU+conv3+bn3+add+ReLU",
                     "conv1_block": "conv1+bn1+ReLU"}
# Seconds kept after the last job for the summary.
RESERVE_S = 20.0
# Lines of the jobs' output not echoed to stdout (still in log.txt): the CPU-only machine's plugin noise.
NOISE = ("cuda drivers", "absl::", "plugin", "TPU_", "libtpu", "InitGoogle", "Source Location")
PYTHON = sys.executable or "python3"


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement: ``argv`` run in the repository root, its JSON stdout lines kept as results.

    ``id`` is ``kind/model@size`` (``ours/resnet50@224``); ``estimate_s`` is the wall time it
    is expected to take, compiles included: what it took on the H200 on 2026-11-26 plus ~40%
    (the stem and BatchNorm jobs: their H100 times of the same day plus a margin; the batch
    search is a guess: it ran out of lease after 170 s and three probes). ``limit_s``, where
    set, kills the job that long after its start even with time left: for a job whose
    estimate is uncertain, so that an overrun costs the jobs after it no more than
    ``limit_s - estimate_s``.
    """

    id: str
    estimate_s: float
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    limit_s: float | None = None


@dataclasses.dataclass
class Outcome:
    id: str
    status: str  # done | failed | killed | skipped
    seconds: float
    estimate_s: float
    reason: str = ""


def _cli(choice: str, *args: str) -> tuple[str, ...]:
    """``resnet-jax ARGS`` with the candidates ``choice`` switched on (``benchmarks/candidates.py
    apply``; ``auto``: the choice this call's ``candidates/`` job made, the model as it is where
    it made none)."""
    return (PYTHON, "benchmarks/candidates.py", "apply", "--choice", choice, "--", *args)


def _bench(model: str, size: str, batch: int, steps: int, *extra: str, choice: str = "auto") -> tuple[str, ...]:
    recipe: tuple[str, ...] = ()
    if model.startswith("resnetrs"):  # the recipe's step (EMA, label smoothing, dropout), as it trains
        recipe = ("--config", f"configs/resnet_rs.py:scaled-{model.removeprefix('resnetrs')}-{size}")
    return _cli(choice, "benchmark", "--json", *recipe, "--model", model, "--batch-size", str(batch),
                "--image-size", size, "--dtype", "bfloat16", "--steps", str(steps), *extra)


def _shell(script: str) -> tuple[str, ...]:
    return ("bash", "-c", "set -euo pipefail\n" + script)


def _split(spec: str) -> tuple[str, str]:
    model, _, size = spec.partition(":")
    return model, size or "224"


def plan(
    models: Sequence[str] = DEFAULT_MODELS,
    batch: int = 256,
    steps: int = 100,
    variant_model: str | None = None,
    xla_variants: Sequence[str] = DEFAULT_XLA_VARIANTS,
    dispatch_variants: Sequence[int] = (4,),
    torchvision_models: Iterable[str] = (),
    flax_models: Iterable[str] = (),
    peer_script: str = ".whl/peer_torchvision.py",
    choice: str = "auto",
) -> list[Job]:
    """The jobs, most important first. ``models[0]`` is the headline model: its peers come next,
    then the ``candidates/`` job that chooses among the changes built but off by default
    (``benchmarks/candidates.py select``), then our rows.

    ``torchvision_models`` / ``flax_models``: the models those peers can run here (torchvision
    needs a CUDA device); the rest get no peer job. Variants, the profile, the trainer, the
    device compile and the batch search use ``variant_model`` (default ``models[0]``).
    ``choice``: the candidates every ``resnet-jax`` job runs with (``candidates.py apply
    --choice``): ``auto``, what this call's ``candidates/`` job chose (none: the model as it
    is); or a spec such as ``fused-conv+fused-stem``, or ``none``, where the ``candidates/``
    job does not run.
    """
    torchvision_models, flax_models = set(torchvision_models), set(flax_models)
    vmodel, vsize = _split(variant_model or models[0])
    vtag = f"{vmodel}@{vsize}"

    def bench(model: str, size: str, steps: int, *extra: str) -> tuple[str, ...]:
        return _bench(model, size, batch, steps, *extra, choice=choice)

    def peers(spec: str) -> list[Job]:
        model, size = _split(spec)
        tag, found = f"{model}@{size}", []
        if model in torchvision_models:  # eager + torch.compile: the compile takes a minute or two
            found.append(Job(f"torchvision/{tag}", {"resnet18": 45, "resnet101": 105}.get(model, 75),
                             (PYTHON, peer_script, "--model", model, "--batch-size", str(batch), "--image-size", size)))
        if model in flax_models:
            found.append(Job(f"flax/{tag}", {"resnet18": 30, "resnet101": 60}.get(model, 50),
                             (PYTHON, "benchmarks/peer_flax.py", "--model", model, "--batch-size", str(batch),
                              "--image-size", size, "--steps", str(steps))))
        return found

    def ours(spec: str) -> Job:
        model, size = _split(spec)
        # H100, 2026-11-26: 25, 79, 70 and 40 s; a little more for the candidates' Triton kernels
        estimate = {"resnet18": 25, "resnet101": 80}.get(model, 80 if model.startswith("resnetrs") else 45)
        return Job(f"ours/{model}@{size}", estimate, bench(model, size, steps))

    profile_dir = "/tmp/device_benchmark_profile"
    profile = Job(f"profile/{vtag}", 40, _shell(
        # command buffers (CUDA graphs) off: kernels inside one name no HLO instruction in the trace
        f"rm -rf {profile_dir}\n"
        f"XLA_FLAGS=--xla_gpu_enable_command_buffer= {shlex.join(bench(vmodel, vsize, 20, '--profile', profile_dir))}"
        " > /dev/null\n"
        # the trace and HLO first: if the report fails on them, they still come back to debug it here
        f"tar -czf \"$OUT/profile.tar.gz\" -C {os.path.dirname(profile_dir)} {os.path.basename(profile_dir)}\n"
        f"{PYTHON} benchmarks/kernel_bandwidth.py {profile_dir} --top 30 | tee \"$OUT/kernel_bandwidth.txt\""))
    # the stem's candidate kernels (benchmarks/stem_variants.py), timed alone at the step's shapes
    # (the training BatchNorm + pool + ReLU as layers and as change 22's op too), then the whole
    # step as the model has it, with each of its GPU kernel choices undone, and with all three
    # undone (H100, 2026-11-26: 169 s with seven whole-step runs; five now)
    stem = Job(f"stem-variants/{vtag}", 170, (PYTHON, "benchmarks/stem_variants.py", "--batch-size", str(batch),
                                               "--image-size", vsize, "--full-step-model", vmodel,
                                               "--full-step-steps", str(max(steps // 2, 5))),
               limit_s=300)
    # the Pallas BatchNorm + ReLU alone at ResNet-50's inner shapes, the statistics kernel at
    # every BatchNorm's shape, and both kernels' block sizes
    # then the whole step with the default blocks and with the small activations' row blocks
    # shrunk to run >= 4 or 8 instances per SM (H100, 2026-11-26: 115 s with the default blocks
    # and two deeper pipelines, which gained nothing)
    bn_relu = Job(f"bn-relu/b{batch}", 120,
                  (PYTHON, "benchmarks/bn_relu_pallas.py", "--batch-size", str(batch), "--full-step-model", vmodel,
                   "--full-step-image-size", vsize, "--full-step-steps", str(max(steps // 2, 5)),
                   "--full-step-blocks", "512x32x4x2x128x528,512x32x4x2x128x1056"),
                  limit_s=200)
    # the candidates fusing BatchNorm into the 1x1 convolutions (changes 9-11): bn2 + conv3, the
    # block's tail with bn3 outside and inside (and without reading z, change 15), and conv1 + bn1
    # at ResNet-50's four shapes each, as the model runs them and fused, each kernel alone at a few
    # blocks, then the whole step with changes 9 and 10, with 11 too, and with those and the stem
    # pool's candidate; not yet timed, so the estimate is a guess
    fused_conv = Job(f"fused-conv/b{batch}", 210,
                     (PYTHON, "benchmarks/fused_conv_pallas.py", "--batch-size", str(batch), "--full-step-model", vmodel,
                      "--full-step-image-size", vsize, "--full-step-steps", str(max(steps // 2, 5))),
                     limit_s=320)
    # the whole step as the model has it, then with each candidate built but off by default added in
    # turn, kept where it is faster (benchmarks/candidates.py); the resnet-jax jobs after it run with
    # its choice. Fourteen compiles of the step (stem-variants: ~24 s each), the Triton kernels' on top
    candidates = Job(f"candidates/{vtag}", 355,
                     (PYTHON, "benchmarks/candidates.py", "select", "--model", vmodel, "--batch-size", str(batch),
                      "--image-size", vsize, "--steps", str(max(steps // 2, 5))),
                     limit_s=460)
    recipe = f"configs/imagenet_resnet.py:{vmodel}-modern"
    workdir = "/tmp/device_benchmark_trainer"
    trainer = Job(f"trainer/{vtag}", 95, _shell(
        # the bare step of the recipe, then `resnet-jax train` itself on fake data made on the host
        # (host-to-device copies, metrics kept on device, a log line every steps/2 steps); its
        # metrics.jsonl lines (with "split") become results of this job
        f"{shlex.join(bench(vmodel, vsize, steps, '--config', recipe))}\n"
        f"rm -rf {workdir}\n"
        f"{shlex.join(_cli(choice, 'train'))} --config {recipe} --workdir {workdir} --config.data.name=fake "
        f"--config.data.image_size={vsize} --config.data.batch_size={batch} --config.data.eval_batch_size={batch} "
        f"--config.data.fake_eval_size={batch} --config.num_train_steps={3 * steps} "
        f"--config.log_every_steps={max(1, steps // 2)} --config.checkpoint_every_steps=1000000000 "
        "--config.eval_every_epochs=1000000 --config.compilation_cache_dir=\n"
        f"cat {workdir}/metrics.jsonl"))
    compile_report = Job(f"compile-report/{vtag}", 25, _shell(
        f"{PYTHON} benchmarks/gpu_compile_report.py --model {vmodel} --batch-size {batch} --image-size {vsize} "
        f"--candidates {choice} --top 10 --dump-hlo /tmp/compile_report.hlo.txt | tee /tmp/compile_report.txt\n"
        "tar -czf \"$OUT/compile_report.tar.gz\" -C /tmp compile_report.txt compile_report.hlo.txt"))
    max_batch = Job(f"max-batch/{vtag}", 480,
                    bench(vmodel, vsize, 10, "--find-max-batch"))
    dispatch = [Job(f"dispatch-{k}/{vtag}", 40,
                    bench(vmodel, vsize, steps, "--steps-per-dispatch", str(k))) for k in dispatch_variants]
    xla = [Job(f"xla-{i}/{vtag}", 40, bench(vmodel, vsize, steps), (("XLA_FLAGS", flags),))
           for i, flags in enumerate(xla_variants, 1)]

    head, rest = models[0], models[1:]
    return [*peers(head), *([candidates] if choice == "auto" else []), ours(head), *map(ours, rest), fused_conv,
            bn_relu, stem, profile, trainer, *[job for spec in rest for job in peers(spec)], *dispatch, *xla,
            compile_report, max_batch]


def select(jobs: Sequence[Job], only: str = "", skip: str = "") -> list[Job]:
    """Jobs whose id matches one of the comma-separated ``only`` patterns (fnmatch; a bare kind
    such as ``ours`` means ``ours/*``) and none of ``skip``'s, in plan order."""

    def matches(job: Job, patterns: str) -> bool:
        return any(fnmatch.fnmatch(job.id, p if "/" in p or "*" in p else p + "/*")
                   for p in filter(None, (p.strip() for p in patterns.split(","))))

    chosen = [job for job in jobs if (not only or matches(job, only)) and not matches(job, skip)]
    if only and not chosen:
        raise SystemExit(f"--only {only!r} matches no job; --list shows the ids")
    return chosen


def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    budget_s: float,
    echo: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    job_limits: bool = True,
) -> list[Outcome]:
    """Runs ``jobs`` in order within ``budget_s`` seconds (less :data:`RESERVE_S` for the summary).

    A job whose estimate exceeds the time left is skipped and the next one tried; a running
    job is killed (its whole process group) at the deadline, or at its own ``limit_s`` first
    (``job_limits=False``: at the deadline only, for a dry run on a slower machine). Every
    JSON object a job prints on a line of its own is appended to ``out/results.jsonl`` at
    once, tagged ``"job": id``; all output goes to ``out/log.txt``; each job's outcome to
    ``out/jobs.jsonl``.
    """
    out.mkdir(parents=True, exist_ok=True)
    deadline = clock() + budget_s - RESERVE_S
    outcomes = []
    with (open(out / "log.txt", "w") as log, open(out / "results.jsonl", "w") as results,
          open(out / "jobs.jsonl", "w") as outcome_lines):
        for job in jobs:
            left = deadline - clock()
            if job.estimate_s > left:
                outcome = Outcome(job.id, "skipped", 0.0, job.estimate_s,
                                  f"needs ~{job.estimate_s:.0f} s, {max(left, 0):.0f} s left")
            else:
                outcome = _run_one(job, out, left, log, results, echo, clock, job_limits)
            echo(f"== {job.id}: {outcome.status} after {outcome.seconds:.0f} s (estimate {job.estimate_s:.0f} s)"
                 + (f": {outcome.reason}" if outcome.reason else ""))
            outcomes.append(outcome)
            outcome_lines.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
            outcome_lines.flush()
    return outcomes


def _run_one(job: Job, out: Path, left: float, log, results, echo, clock, job_limits: bool = True) -> Outcome:
    echo(f"== {job.id} (estimate {job.estimate_s:.0f} s, {left:.0f} s left)")
    log.write(f"== {job.id}: {shlex.join(job.argv)}\n")
    log.flush()
    env = {**os.environ, "OUT": str(out.resolve()), "PYTHONUNBUFFERED": "1", **dict(job.env)}
    start = clock()
    timeout = min(left, job.limit_s) if job.limit_s and job_limits else left
    proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            stripped = line.strip()
            if stripped.startswith("{"):
                try:
                    row = json.loads(stripped)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    results.write(json.dumps({"job": job.id, **row}) + "\n")
                    results.flush()
            if not any(n in line for n in NOISE):
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        why = (f"ran past its limit of {timeout:.0f} s" if timeout < left
               else f"still running at the deadline ({left:.0f} s after its start)")
        return Outcome(job.id, "killed", clock() - start, job.estimate_s, why)
    reader.join(timeout=10)
    seconds = clock() - start
    if code:
        return Outcome(job.id, "failed", seconds, job.estimate_s, f"exit status {code} (log.txt has its output)")
    return Outcome(job.id, "done", seconds, job.estimate_s)


def summary(rows: Sequence[dict], outcomes: Sequence[Outcome], choice: str = "auto") -> str:
    """The README table (ours against the fastest peer of the same model and size), the
    candidates chosen and what each ``resnet-jax`` job ran with, and what is owed (``choice``:
    the call's ``--candidates``, carried into the owed line)."""

    def kind(row: dict) -> str:
        return row["job"].split("/")[0]

    # candidates.py apply's first line in each resnet-jax job: what that job switched on
    ran_with = {r["job"]: r for r in rows if r.get("part") == "candidates"}
    rows = [r for r in rows if r.get("part") != "candidates"]

    def gib(value: float | None) -> str:
        return f"{value:.1f}" if value else "-"

    lines = []
    for row in (r for r in rows if kind(r) == "device"):
        lines.append("device: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "job" and v))
    peer = [r for r in rows if kind(r) in ("torchvision", "flax")]
    lines.append(f"{'model':<12}{'size':>5}{'batch':>6}{'ours img/s':>11}{'min-max':>12}{'MFU':>7}{'mem GiB':>8}"
                 f"{'compile s':>10}{'tv eager':>9}{'tv compile':>11}{'flax':>7}{'ratio':>7}{'tv GiB':>7}{'flax GiB':>9}")
    for r in (r for r in rows if kind(r) == "ours"):
        same = [q for q in peer if q["job"].split("/")[1] == f"{r['model']}@{r['image_size']}"]
        by = {q["peer"].split()[-1].replace("torch.", ""): q for q in same if kind(q) == "torchvision"}
        by.update({"flax": q for q in same if kind(q) == "flax"})
        best = max((q["images_per_s"] for q in by.values()), default=None)
        ratio = f"{r['images_per_second'] / best:.2f}" if best else "-"
        tv_gib = max((by[k]["peak_memory_gib"] or 0 for k in ("eager", "compile") if k in by), default=None)
        rate = {k: f"{by[k]['images_per_s']:.0f}" if k in by else "-" for k in ("eager", "compile", "flax")}
        flax_gib = (by.get("flax") or {}).get("peak_memory_gib")
        lines.append(
            f"{r['model']:<12}{r['image_size']:>5}{r['batch_size']:>6}{r['images_per_second']:>11.0f}"
            f"{r['images_per_second_min']:>6.0f}-{r['images_per_second_max']:<5.0f}{100 * (r['mfu'] or 0):>6.1f}%"
            f"{r['peak_memory_gib'] or 0:>8.1f}{r['compile_seconds']:>10.1f}{rate['eager']:>9}{rate['compile']:>11}"
            f"{rate['flax']:>7}{ratio:>7}{gib(tv_gib):>7}{gib(flax_gib):>9}")
    lines.append("ratio: ours / the fastest peer of the row (torchvision eager, torch.compile, plain flax)")
    for spec in dict.fromkeys(r["candidates"] for r in ran_with.values()):
        jobs = [job for job, r in ran_with.items() if r["candidates"] == spec]
        lines.append(f"candidates on: {spec} in {', '.join(jobs)} ({ran_with[jobs[0]]['source']})")
    for c in (r for r in rows if kind(r) == "candidates"):
        if c["part"] == "choice":
            if c.get("final"):
                lines.append(f"candidates chosen: {c['candidates']} ({c['vs_model']:.3f}x the model's step)")
        elif "images_per_second" not in c:
            lines.append(f"candidate {c['trying']} not run: {c.get('error') or c.get('why')}")
        else:
            lines.append(f"{c['job'].split('/')[1]} step + {c['trying']}"
                         + (f" with {c['with']}" if "with" in c else "") + f": {c['images_per_second']:.0f} img/s "
                         f"({c['vs_model']:.3f}x the model's, {c['vs_kept']:.3f}x what was kept; peak "
                         f"{gib(c['peak_memory_gib'])} GiB; max loss diff {c['max_loss_diff_vs_model']:.1e}): "
                         + ("kept" if c["kept"] else f"not kept, {c['why']}"))
    ours = {(r["model"], r["image_size"], r["batch_size"]): r["images_per_second"] for r in rows if kind(r) == "ours"}
    for v in (r for r in rows if kind(r).startswith(("xla-", "dispatch-"))):
        base = ours.get((v["model"], v["image_size"], v["batch_size"]))
        what = (f"XLA_FLAGS={v['xla_flags']}" if v.get("xla_flags") else "") + (
            f" {v['steps_per_dispatch']} steps per dispatch" if v.get("steps_per_dispatch", 1) > 1 else "")
        lines.append(f"{v['model']} @{v['image_size']} {what.strip()}: {v['images_per_second']:.0f} img/s "
                     f"(min {v['images_per_second_min']:.0f}, max {v['images_per_second_max']:.0f})"
                     + (f" {v['images_per_second'] / base - 1:+.1%} vs the plain run" if base else ""))
    for c in (r for r in rows if kind(r) == "stem-variants"):
        if c["part"] == "train_step":
            head = (f"stem in the {c['model']} step, conv {c['conv']}, pool {c['pool']}, "
                    f"BatchNorm {c.get('bn_relu', 'model')}: ")
            lines.append(head + (f"failed: {c['error'][:200]}" if "error" in c else
                                 f"{c['images_per_second']:.0f} img/s ({c['vs_model']:.3f}x the model's own; "
                                 f"max loss diff {c['max_loss_diff_vs_model']:.1e}"
                                 + (f"; compiled in {c['compile_seconds']:.1f} s" if c.get("compile_seconds") else "")
                                 + ")"))
        else:
            lines.append(f"stem {c['part']} {c['variant']} @{c['image_size']}: {c['ms']:.3f} ms forward+backward "
                         f"({c['vs_current']:.2f}x the current kernel; max rel. diff {c['max_rel_diff_vs_first']:.1e})")
    for b in (r for r in rows if kind(r) == "bn-relu"):
        if "error" in b:  # a candidate that failed on the device: its error, not a timing
            what = b.get("impl") or b.get("blocks")
            lines.append(f"BatchNorm kernel {b['part']} {what} {tuple(b.get('shape', ()))} failed: {b['error'][:200]}")
        elif b["part"] == "train_step":
            lines.append(f"{b['model']} step with the BatchNorm kernels' blocks {b['blocks']}: "
                         f"{b['images_per_second']:.0f} img/s ({b['vs_default']:.3f}x the default blocks; "
                         f"max loss diff {b['max_loss_diff_vs_default']:.1e})")
        elif b["part"] == "bn_relu":
            lines.append(f"BatchNorm+ReLU {tuple(b['shape'])} {b['impl']}: {b['ms']:.3f} ms forward+backward "
                         f"(max rel. diff {b['max_rel_diff_vs_model']:.1e} vs the model's)")
        elif b["part"] == "moments":
            lines.append(f"BatchNorm statistics {tuple(b['shape'])} {b['impl']}: {b['ms']:.3f} ms, {b['gb_per_s']} GB/s "
                         f"(max rel. diff {b['max_rel_diff_vs_xla']:.1e} vs XLA's)")
        else:  # grad_sums_kernel, moments_kernel: one kernel alone at one block size
            lines.append(f"BatchNorm {b['part'].replace('_', ' ')} {b['blocks']} on {tuple(b['shape'])}: "
                         f"{b['ms']:.3f} ms, {b['gb_per_s']} GB/s")
    for f in (r for r in rows if kind(r) == "fused-conv"):
        if "error" in f:
            what = f.get("impl") or f.get("blocks") or f.get("bn_relu")
            lines.append(f"fused conv {f['part']} {what} {tuple(f.get('shape', ()))} failed: {f['error'][:200]}")
        elif f["part"] == "train_step":
            lines.append(f"{f['model']} step, BatchNorm {f['bn_relu']}, pool {f['pool']}: {f['images_per_second']:.0f} img/s "
                         f"({f['vs_model']:.3f}x the model's own; peak {gib(f['peak_memory_gib'])} GiB; "
                         f"max loss diff {f['max_loss_diff_vs_model']:.1e}"
                         + (f"; compiled in {f['compile_seconds']:.1f} s" if f.get("compile_seconds") else "") + ")")
        elif f["part"] in FUSED_CONV_BLOCKS:
            lines.append(f"{FUSED_CONV_BLOCKS[f['part']]} {tuple(f['shape'])} -> {f['out_channels']} {f['impl']}: "
                         f"{f['ms']:.3f} ms forward+backward"
                         + (f" (max rel. diff {f['max_rel_diff_vs_model']:.1e} vs the model's)"
                            if "max_rel_diff_vs_model" in f else ""))
        else:  # forward_kernel, wgrad_kernel: one kernel alone at one block size
            lines.append(f"fused conv {f['part'].replace('_', ' ')} {f['blocks']} on {tuple(f['shape'])}: "
                         f"{f['ms']:.3f} ms, {f['gb_per_s']} GB/s, {f['tflop_per_s']} TFLOP/s")
    for m in (r for r in rows if kind(r) == "max-batch"):
        lines.append(f"{m['model']} @{m['image_size']} largest batch: {m['max_batch']}"
                     + (f" ({m['max_batch_fails']} does not fit)" if m["max_batch_fails"] else "")
                     + f" within the {m['memory_limit_gib']:.1f} GiB XLA may allocate")
    trainer = [r for r in rows if kind(r) == "trainer"]
    windows = [r["images_per_second"] for r in trainer if r.get("split") == "train" and "images_per_second" in r]
    for bare in [r for r in trainer if "split" not in r][-1:]:
        steady = sorted(windows[1:] or windows)  # the first window follows compilation: left out
        if steady:
            median = steady[len(steady) // 2]
            lines.append(f"resnet-jax train {bare['config']} @{bare['image_size']}, batch {bare['batch_size']}: "
                         f"{median:.0f} img/s (median of {len(steady)} log windows, {steady[0]:.0f}-{steady[-1]:.0f}); "
                         f"its bare step {bare['images_per_second']:.0f}: {median / bare['images_per_second'] - 1:+.1%}")
    lines.append("jobs: " + ", ".join(f"{o.id} {o.status} {o.seconds:.0f}/{o.estimate_s:.0f} s" for o in outcomes))
    # the next call runs with this call's choice, so its candidates job is not owed again
    chosen = [r["candidates"] for r in rows if r.get("part") == "choice"][-1:] or ([choice] if choice != "auto" else [])
    owed = [o.id for o in outcomes if o.status != "done" and not (chosen and o.id.startswith("candidates/"))]
    if owed:
        carry = f" --candidates {chosen[0]}" if chosen else ""
        lines.append(f"owed ({len(owed)}): bash benchmarks/device_benchmark.sh{carry} --only {','.join(owed)}")
    else:
        lines.append("owed: nothing")
    return "\n".join(lines)


def _peer_models(candidates: Iterable[str]) -> tuple[set[str], set[str]]:
    """The models torchvision (needs torch with a CUDA device) and the flax peer can run here."""
    names = sorted({_split(s)[0] for s in candidates})
    probe = ("import json, sys\n"
             "tv = []\n"
             "try:\n"
             "    import torch, torchvision.models as m\n"
             "    tv = [n for n in sys.argv[1:] if torch.cuda.is_available() and hasattr(m, n)]\n"
             "except ImportError:\n"
             "    pass\n"
             "import benchmarks.peer_flax as p\n"
             "print(json.dumps([tv, [n for n in sys.argv[1:] if n in p.STAGES]]))")
    found = subprocess.run([PYTHON, "-c", probe, *names], capture_output=True, text=True)
    if found.returncode:
        print(f"peer probe failed, no peers will run:\n{found.stderr[-2000:]}", file=sys.stderr)
        return set(), set()
    tv, flax = json.loads(found.stdout.strip().splitlines()[-1])
    return set(tv), set(flax)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_out"), help="default: $OUT")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="seconds this call may take (default 570, inside the 600 s a device command may run)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated MODEL:SIZE; the first is the headline model (default %(default)s)")
    p.add_argument("--variant-model", help="MODEL:SIZE of the profile, variants, trainer and batch search "
                                           "(default: the first of --models)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    p.add_argument("--xla-variants", default=";".join(DEFAULT_XLA_VARIANTS),
                   help="';'-separated XLA_FLAGS strings, each timed once; give it as --xla-variants=... since the "
                        "flags start with '--' (default %(default)s)")
    p.add_argument("--dispatch-variants", default="4", help="comma-separated K for --steps-per-dispatch")
    p.add_argument("--candidates", default="auto",
                   help="the candidates built but off by default that the resnet-jax jobs switch on: 'auto' "
                        "(default), what this call's candidates/ job chooses; or names joined by '+' "
                        "(benchmarks/candidates.py), or 'none', without that job")
    p.add_argument("--only", default="", help="comma-separated job ids or patterns (ours, flax/*, profile/resnet50@224)")
    p.add_argument("--skip", default="", help="the same, for jobs not to run")
    p.add_argument("--no-job-limits", dest="job_limits", action="store_false",
                   help="stop jobs at the --budget-s deadline only, not at their own limits, which are sized for "
                        "the device (a CPU dry run: its compiles take several times longer)")
    p.add_argument("--list", action="store_true", help="print the plan with its estimates and exit")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    os.chdir(Path(__file__).resolve().parent.parent)  # the jobs' paths are relative to the repository root

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models:
        p.error("--models names no model")
    if a.candidates != "auto":  # refused here, not in every job on the device
        from benchmarks.candidates import parse_choice

        try:
            parse_choice(a.candidates)
        except ValueError as e:
            p.error(f"--candidates: {e}")
    tv, flax = _peer_models(models)
    jobs = select(plan(models, a.batch_size, a.steps, a.variant_model,
                       [f for f in a.xla_variants.split(";") if f.strip()],
                       [int(k) for k in a.dispatch_variants.split(",") if k.strip()],
                       tv, flax, ".whl/peer_torchvision.py" if os.path.exists(".whl/peer_torchvision.py")
                       else "../shared/bench/peer_torchvision.py", a.candidates), a.only, a.skip)
    device = Job("device/-", 10, (PYTHON, "-c", (
        "import json, subprocess, jax\n"
        "gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],"
        " capture_output=True, text=True).stdout.strip() if __import__('shutil').which('nvidia-smi') else ''\n"
        "try:\n    import torch; tv = torch.__version__\nexcept ImportError:\n    tv = None\n"
        "print(json.dumps({'gpu': gpu, 'jax': jax.__version__, 'devices': str(jax.devices()), 'torch': tv}))")))
    if a.list:  # what run_jobs would do if every job took its estimate
        left = a.budget_s - RESERVE_S
        for job in [device, *jobs]:
            runs = job.estimate_s <= left
            left -= job.estimate_s if runs else 0
            print(f"{job.id:<32}{job.estimate_s:>6.0f} s  " + ("runs" if runs else "skipped: next call"))
        no_peer = sorted({_split(m)[0] for m in models} - tv)
        if no_peer:
            print(f"no torchvision job for {', '.join(no_peer)} (needs torch with a CUDA device and the model)")
        return 0

    outcomes = run_jobs([device, *jobs], out, a.budget_s, job_limits=a.job_limits)
    rows = [json.loads(line) for line in open(out / "results.jsonl")] if (out / "results.jsonl").exists() else []
    try:
        text = summary(rows, outcomes, a.candidates)
    except (KeyError, TypeError, ValueError) as e:  # the rows are safe in results.jsonl; say so, don't lose the call
        text = f"the summary failed ({e!r}): results.jsonl and jobs.jsonl hold every row"
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(o.status == "done" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
