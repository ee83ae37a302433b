"""The candidate changes that are built but off by default (docs/performance.md, changes 8 to 22):
chosen on the device by timing the whole train step, then applied to any ``resnet-jax`` command.

A drawn task has 15 minutes of device time, and a warm machine goes back 30 s after a call, so
"time the candidates, switch the winners on here, then time the README's rows" would need a
second machine start. Instead one call does both: ``select`` chooses, and the rows after it
run with the choice through ``apply``.

``select`` times the whole train step (``resnet-jax benchmark``'s measurement) as the model has
it, then adds the candidates one at a time in the order of :data:`CANDIDATES`, keeping each that
makes the step at least ``--min-gain`` faster than the best so far (default 0.5%: about twice
the spread of repeated runs of one step on the H100) with every loss within ``--loss-tolerance``
of the model's (default 0.05, :data:`LOSS_TOLERANCE`). A candidate that builds on one not kept
(change 11 on change 9) is tried together with it, since it may pay for it. A greedy choice:
fourteen compiles instead of the 1,728 combinations. It prints one
JSON row per run and, after each, the choice so far::

    {"part": "choice", "candidates": "fused-conv+fused-bn3", "images_per_second": ..., "vs_model": ..., "final": false}

so a job killed part-way still leaves a choice made of whole measurements.

``apply`` runs ``resnet_jax.cli`` with a choice patched in (``--choice SPEC``, or ``--choice
auto``: the last choice row in ``$OUT/results.jsonl``, which the device job runner writes; none
there: the model as it is). It prints ``{"part": "candidates", "candidates": SPEC, "source": ...}``
first, so that the rows after it say what they ran::

    python3 benchmarks/candidates.py select --model resnet50 --batch-size 256
    python3 benchmarks/candidates.py apply --choice fused-conv+fused-stem -- benchmark --json --model resnet50

A candidate that wins is then switched on in the library (its flag's default), not left to this
script: these patches are the benchmarks' way in, as DESIGN.md keeps run-time choices in the config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet_jax.models import blocks, layers, pallas_batch_norm, pallas_fused_conv  # noqa: E402
from resnet_jax.train import step  # noqa: E402

MIN_GAIN = 0.005
# bf16 rounding differences grow over a run's ~55 steps: the stem's correct variants differed from
# the model by <= 0.005 at batch 256 on the H100, the fused convolutions by 0.012 at batch 4 on
# CPU, and the model differed from itself by 0.021 across XLA's fusion choices (the loss-curve
# test). A kernel bug worth catching here (the op-level tests catch the subtle ones) is far
# larger, or NaN, which is never within tolerance.
LOSS_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One change that is off by default: the module attributes it sets, and the candidate it
    builds on (``requires``), if any."""

    name: str
    change: int  # its number in docs/performance.md
    what: str
    patches: tuple[tuple[object, str, object], ...]
    requires: str | None = None


# In the order ``select`` tries them: the largest predicted gain first, so that the ones
# after it are judged on top of it.
CANDIDATES = (
    Candidate("fused-conv", 9, "bn2 + ReLU, conv3 and bn3's statistics as one Triton GEMM (blocks.FUSE_BN2_CONV3)",
              ((blocks, "FUSE_BN2_CONV3", True),)),
    Candidate("small-tiles", 19, "the Triton GEMMs of changes 9-17 in 64-row blocks of 4 warps instead of 128 rows "
                                 "of 8 (pallas_fused_conv.BLOCK_M, NUM_WARPS): 2-4 instances per SM where the "
                                 "larger ones fit 1-2, for these bandwidth-bound GEMMs' memory latency",
              ((pallas_fused_conv, "BLOCK_M", 64), (pallas_fused_conv, "NUM_WARPS", 4)), requires="fused-conv"),
    Candidate("fused-bn3", 11, "bn3 inside change 9's op, its input gradient computed in conv3's backward GEMMs "
                               "(blocks.FUSE_BN3)", ((blocks, "FUSE_BN3", True),), requires="fused-conv"),
    Candidate("grad-sums", 12, "bn2's backward sums in change 11's input-gradient GEMM "
                               "(pallas_fused_conv.INPUT_GRAD_SUMS)", ((pallas_fused_conv, "INPUT_GRAD_SUMS", True),),
              requires="fused-bn3"),
    Candidate("gram-backward", 15, "the backward GEMMs of change 11's op (and change 13's) take the BatchNorm's "
                                   "gradient through y^T g, y^T y and w diag(s) w^T, never reading z "
                                   "(pallas_fused_conv.GRAM_BACKWARD)", ((pallas_fused_conv, "GRAM_BACKWARD", True),),
              requires="fused-bn3"),
    Candidate("fused-residual", 16, "bn3, the residual add and ReLU in the epilogue of change 11's GEMM, bn3's "
                                    "statistics from y^T y, z never stored (blocks.FUSE_RESIDUAL)",
              ((blocks, "FUSE_RESIDUAL", True),), requires="fused-bn3"),
    Candidate("fused-projection", 17, "in projection blocks too: the shortcut's conv and BatchNorm computed by "
                                      "the same GEMM, neither conv's output stored (blocks.FUSE_PROJECTION)",
              ((blocks, "FUSE_PROJECTION", True),), requires="fused-residual"),
    Candidate("fused-conv1", 10, "conv1 sums bn1's statistics as it stores its output (blocks.FUSE_CONV1_BN1)",
              ((blocks, "FUSE_CONV1_BN1", True),)),
    Candidate("fused-shortcut", 13, "each projection shortcut's conv and BatchNorm as one op, the BatchNorm's "
                                    "gradient in the conv's backward GEMMs (layers.FUSE_SHORTCUT)",
              ((layers, "FUSE_SHORTCUT", True),)),
    Candidate("fused-stem", 22, "the stem's BatchNorm, max pool and ReLU as one op whose two backward kernels build "
                                "the pool's gradient in registers instead of storing it (layers.FUSE_STEM_POOL); "
                                "it takes change 7's (planes-pool) place, whose reverse pass it replaces",
              ((layers, "FUSE_STEM_POOL", True),)),
    Candidate("min-programs", 8, "the Pallas BatchNorm kernels run >= 4 instances per SM on small activations "
                                 "(pallas_batch_norm.MIN_PROGRAMS = 528)", ((pallas_batch_norm, "MIN_PROGRAMS", 528),)),
    Candidate("grad-layout", 21, "the weight gradients laid out as the parameters are before the optimizer "
                                 "(step.GRADS_IN_PARAM_LAYOUT), so that XLA updates the donated state in place: "
                                 "one bf16 transpose per conv weight instead of two float32 copies",
              ((step, "GRADS_IN_PARAM_LAYOUT", True),)),
    Candidate("keep-state", 20, "the step's state not donated (step.DONATE_STATE): the update writes fresh buffers, "
                                "with neither the copies into the old ones nor grad-layout's transposes (which "
                                "it turns off), peak memory up by about the parameters' size",
              ((step, "DONATE_STATE", False),)),
)
BY_NAME = {c.name: c for c in CANDIDATES}
NONE = "none"


def parse_choice(spec: str) -> tuple[Candidate, ...]:
    """``"none"`` (or empty) or candidate names joined by ``+``, as :data:`CANDIDATES` orders
    them. An unknown name, a repeat, or a candidate without the one it builds on is refused."""
    names = [n.strip() for n in spec.split("+") if n.strip() and n.strip() != NONE]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown candidate(s) {', '.join(map(repr, unknown))} in {spec!r}; "
                         f"known: {', '.join(BY_NAME)} (or {NONE!r})")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate spec {spec!r} names one candidate twice")
    for n in names:
        if BY_NAME[n].requires and BY_NAME[n].requires not in names:
            raise ValueError(f"{n!r} builds on {BY_NAME[n].requires!r}: add it to {spec!r}")
    return tuple(c for c in CANDIDATES if c.name in names)


def with_requirements(candidate: Candidate) -> tuple[Candidate, ...]:
    """``candidate`` and what it builds on, and what that builds on, in :data:`CANDIDATES`' order."""
    chain = [candidate]
    while chain[-1].requires:
        chain.append(BY_NAME[chain[-1].requires])
    return tuple(c for c in CANDIDATES if c in chain)


def spec_of(choice: Sequence[Candidate]) -> str:
    return "+".join(c.name for c in choice) or NONE


@contextlib.contextmanager
def applied(choice: Sequence[Candidate]) -> Iterator[None]:
    """Within the block, models built and traced run with ``choice`` switched on."""
    originals = [(module, name, getattr(module, name)) for c in choice for module, name, _ in c.patches]
    try:
        for c in choice:
            for module, name, value in c.patches:
                setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(originals):
            setattr(module, name, value)


def select(measure: Callable[[tuple[Candidate, ...]], dict], candidates: Sequence[Candidate] = CANDIDATES,
           min_gain: float = MIN_GAIN, loss_tolerance: float = LOSS_TOLERANCE,
           emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> tuple[Candidate, ...]:
    """The greedy choice (module docstring). ``measure(choice)`` returns ``benchmark.measure``'s
    dict for the step with ``choice`` on (``images_per_second`` and ``losses`` are read). The
    model's own run raising is raised (nothing to compare with); a candidate's is an error row
    and the next is tried (one that builds on it is not). Every run, and the choice after it, goes to ``emit``."""
    base = measure(())
    best, kept = base["images_per_second"], ()

    def figures(r: dict) -> dict:
        return {"images_per_second": round(r["images_per_second"], 1), "peak_memory_gib": r.get("peak_memory_gib"),
                "compiled_memory_gib": r.get("compiled_memory_gib"), "compile_seconds": r.get("compile_seconds")}

    def choice_row(final: bool) -> dict:
        return {"part": "choice", "candidates": spec_of(kept), "images_per_second": round(best, 1),
                "vs_model": round(best / base["images_per_second"], 4), "final": final}

    emit({"part": "train_step", "candidates": NONE, "trying": NONE, **figures(base), "vs_model": 1.0,
          "vs_kept": 1.0, "max_loss_diff_vs_model": 0.0, "kept": True})
    emit(choice_row(False))
    failed = set()
    for candidate in candidates:
        # with what it builds on where that was not kept (did not gain enough alone: change 11 may
        # pay for change 9; one compile either way), but not where that failed to run
        missing = [c for c in with_requirements(candidate)[:-1] if c not in kept]
        trial = parse_choice(spec_of((*kept, *missing, candidate)))
        what = {"part": "train_step", "candidates": spec_of(trial), "trying": candidate.name,
                **({"with": spec_of(missing)} if missing else {}), "change": candidate.change}
        if broken := [c.name for c in missing if c.name in failed]:
            emit({**what, "kept": False, "why": f"builds on {', '.join(broken)}, which failed"})
            failed.add(candidate.name)
            continue
        try:
            r = measure(trial)
        except Exception as e:  # a candidate that fails on the device is a result; the rest still run
            emit({**what, "kept": False, "error": str(e)[:300]})
            failed.add(candidate.name)
            continue
        diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"])]
        # max() would pass over a NaN (every comparison with it is False): a NaN loss is never within tolerance
        diff = math.nan if any(map(math.isnan, diffs)) else max(diffs, default=math.inf)
        gain = r["images_per_second"] / best
        why = (f"loss differs from the model's by {diff:.2g} > {loss_tolerance}" if not diff <= loss_tolerance else
               f"{gain - 1:+.2%} on what was kept, under the {min_gain:.1%} asked" if gain < 1 + min_gain else "")
        emit({**what, **figures(r), "vs_model": round(r["images_per_second"] / base["images_per_second"], 4),
              "vs_kept": round(gain, 4), "max_loss_diff_vs_model": diff, "kept": not why, **({"why": why} if why else {})})
        if not why:
            kept, best = trial, r["images_per_second"]
        emit(choice_row(False))
    emit(choice_row(True))
    return kept


def choice_from_results(path: Path) -> tuple[tuple[Candidate, ...], str]:
    """The last ``"part": "choice"`` row in the JSON lines at ``path`` (the device runner's
    results.jsonl), and where it came from; none there (or no file): the model as it is."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("part") == "choice":
                rows.append(row)
    if not rows:
        return (), f"no choice in {path}: the model as it is"
    last = rows[-1]
    return parse_choice(last["candidates"]), (
        f"{last.get('job', 'a select run')}'s {'final' if last.get('final') else 'partial'} choice "
        f"({last.get('vs_model', 1.0):.3f}x the model's step there)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="time the step with each candidate added in turn; print the choice")
    s.add_argument("--model", default="resnet50")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--steps", type=int, default=50, help="timed steps per run (default 50)")
    s.add_argument("--min-gain", type=float, default=MIN_GAIN)
    s.add_argument("--loss-tolerance", type=float, default=LOSS_TOLERANCE)
    s.add_argument("--candidates", default="+".join(BY_NAME),
                   help="the candidates to try, in this order (default: all, %(default)s)")
    a_ = sub.add_parser("apply", help="run a resnet-jax command with a choice patched in")
    a_.add_argument("--choice", default="auto",
                    help=f"candidate names joined by '+', {NONE!r}, or 'auto' (default): the last choice "
                         "in $OUT/results.jsonl")
    a_.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the resnet-jax command and its arguments")
    a = p.parse_args(argv)

    if a.command == "apply":
        if a.choice == "auto":
            choice, source = choice_from_results(Path(os.environ.get("OUT", "/tmp/bench_out")) / "results.jsonl")
        else:
            try:
                choice, source = parse_choice(a.choice), "--choice"
            except ValueError as e:
                p.error(str(e))
        cli_args = a.cli[1:] if a.cli[:1] == ["--"] else a.cli
        if not cli_args:
            p.error("apply: give the resnet-jax command after --, e.g. -- benchmark --json --model resnet50")
        print(json.dumps({"part": "candidates", "candidates": spec_of(choice), "source": source}), flush=True)
        from resnet_jax import cli

        with applied(choice):
            return cli.main(cli_args)

    # a name that builds on one not listed is refused here (parse_choice), not skipped later
    try:
        tried = [BY_NAME[n] for n in a.candidates.split("+") if n] if a.candidates != NONE else []
        parse_choice("+".join(c.name for c in tried))
    except (KeyError, ValueError) as e:
        p.error(f"--candidates {a.candidates!r}: {e}")
    from benchmarks.stem_variants import full_step

    def measure(choice: tuple[Candidate, ...]) -> dict:
        with applied(choice):
            return full_step(a.model, a.batch_size, a.image_size, a.dtype, a.steps)

    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    select(measure, tried, a.min_gain, a.loss_tolerance, emit)
    print(f"\nwhole {a.model} train step, batch {a.batch_size} @{a.image_size}px {a.dtype}, candidates added in turn "
          f"(kept where >= {a.min_gain:.1%} faster than what was kept, losses within {a.loss_tolerance}):")
    for r in (r for r in rows if r["part"] == "train_step"):
        head = f"  + {r['trying'] + (' with ' + r['with'] if 'with' in r else ''):<26}"
        if "images_per_second" not in r:
            print(head + f"not run: {r.get('error') or r.get('why')}")
            continue
        print(head + f"{r['images_per_second']:>9.1f} images/s {r['vs_model']:>7.3f}x the model's  "
              f"peak {r['peak_memory_gib'] or 0:.2f} GiB  loss diff {r['max_loss_diff_vs_model']:.2g}  "
              + ("kept" if r["kept"] else f"not kept: {r['why']}"))
    final = rows[-1]
    print(f"choice: {final['candidates']} ({final['vs_model']:.3f}x the model's step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
