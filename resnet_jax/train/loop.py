"""``train_and_evaluate(config, workdir)``: the outer training loop, importable from a notebook.

Flow: mesh over all devices -> this process's input pipeline -> model from the
registry -> TrainState created sharded, or restored from the newest checkpoint in
``workdir`` -> the jitted train step over global batches -> eval over the whole
split every ``eval_every_epochs`` and at the end -> asynchronous checkpoints ->
a line per ``log_every_steps`` on stdout, plus ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data import create_pipeline, to_global_batches
from resnet_jax.models import create_model
from resnet_jax.train import checkpoint as ckpt_lib
from resnet_jax.train import optim, sharding
from resnet_jax.train.state import TrainState, init_state
from resnet_jax.train.step import compile_steps
from resnet_jax.train.writers import MetricWriter, log

NO_STEP = np.iinfo(np.int32).max


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    pipeline: Any
    model: Any
    schedule: Any
    tx: Any
    abstract_state: TrainState
    state_sharding: Any
    train_step: Any
    eval_step: Any
    total_steps: int


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The registry model named by ``config.model`` with its overrides applied."""
    m = config.model
    kwargs = dict(
        num_classes=m.num_classes if m.num_classes is not None else num_classes,
        dtype=jnp.dtype(m.dtype),
        drop_path_rate=m.drop_path_rate,
        dropout_rate=m.dropout_rate,
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
        bn_group_size=m.bn_group_size,
    )
    if m.zero_init_last is not None:
        kwargs["zero_init_last"] = m.zero_init_last
    kwargs.update(m.overrides.to_dict())
    return create_model(m.name, **kwargs)


def enable_compilation_cache(cache_dir: str) -> str:
    """Turns on jax's persistent compilation cache in a folder of ``cache_dir`` (``~`` expanded)
    named by this library's version and a digest of its Pallas modules; returns it.

    On a GPU the step's BatchNorm sums (and the fused BatchNorm + convolution's kernels, where
    they are on) are ``custom_partitioning`` ops, whose cache key holds
    a pointer to their Python callbacks: with the batch sharded, every new process would miss
    the cache and compile again (checked on 4 CPU devices). The pointer is left out of the
    key (``jax_remove_custom_partitioning_ptr_from_cache_key``), and the folder's name stands
    in for the callbacks: an entry is only found by the code that wrote it. Programs that
    compile in under ``jax_persistent_cache_min_compile_time_secs`` (default 1 s; env
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``) are not worth a file and stay uncached.
    """
    from resnet_jax import __version__
    from resnet_jax.models import pallas_batch_norm, pallas_fused_conv

    sha = hashlib.sha256()
    for module in (pallas_batch_norm, pallas_fused_conv):  # the modules whose callbacks the key leaves out
        with open(module.__file__, "rb") as f:
            sha.update(f.read())
    digest = sha.hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cache_dir), f"resnet_jax-{__version__}-{digest}")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    return path


def setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
    """Builds mesh, pipeline, model, optimizer and compiled steps for ``config``."""
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    mesh = sharding.create_mesh(devices)
    pipeline = create_pipeline(config.data, config.seed, device_count=mesh.size)
    info = pipeline.info
    model = build_model(config, info.num_classes)
    steps_per_epoch = pipeline.steps_per_epoch
    total_steps = config.num_train_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    schedule = optim.create_schedule(config, steps_per_epoch, total_steps)
    tx = optim.create_optimizer(config, schedule)
    abstract_state = jax.eval_shape(
        lambda: init_state(model, tx, config.seed, model_input_shape(config, info), bool(config.ema_decay))
    )
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.shard_params)
    train_step, eval_step = compile_steps(
        model, tx, state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh),
        config.label_smoothing, config.ema_decay, config.data.mixup_alpha, config.data.cutmix_alpha,
    )
    return Setup(
        config, mesh, pipeline, model, schedule, tx, abstract_state, state_sharding,
        train_step, eval_step, total_steps,
    )


def model_input_shape(config: ml_collections.ConfigDict, info: Any) -> tuple[int, int, int]:
    """(H, W, C) of one model input: the configured size, the dataset's channels."""
    channels = info.image_shape[-1] if info.image_shape else 3
    return (config.data.image_size, config.data.image_size, channels)


def create_state(s: Setup) -> TrainState:
    """A freshly initialised state, created directly with its shardings."""
    c = s.config
    shape = model_input_shape(c, s.pipeline.info)
    init = jax.jit(
        lambda: init_state(s.model, s.tx, c.seed, shape, bool(c.ema_decay)), out_shardings=s.state_sharding
    )
    return init()


AVERAGED = ("loss", "top1", "top5")


@jax.jit
def _accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Sums the averaged metrics and remembers the first step whose loss was NaN/inf."""
    out = {k: acc[k] + metrics[k] for k in AVERAGED}
    bad = jnp.where(metrics["nonfinite"] > 0, step, NO_STEP)
    out["first_nonfinite_step"] = jnp.minimum(acc["first_nonfinite_step"], bad)
    out["steps"] = acc["steps"] + 1
    return out


def _empty_accumulator() -> dict:
    zero = jnp.zeros((), jnp.float32)
    return {**{k: zero for k in AVERAGED}, "first_nonfinite_step": jnp.asarray(NO_STEP, jnp.int32), "steps": zero}


def evaluate(s: Setup, state: TrainState) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of the eval split (EMA weights if enabled)."""
    total = None
    batches = to_global_batches(s.pipeline.eval_batches(), sharding.batch_sharding(s.mesh), s.config.data.prefetch)
    for batch in batches:
        sums = s.eval_step(state, batch)
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    total = jax.device_get(total)
    count = float(total["count"])
    expected = s.pipeline.info.num_eval
    if int(round(count)) != expected:
        raise RuntimeError(f"eval saw {count:.0f} examples, the split has {expected}")
    return {
        "loss": float(total["loss_sum"]) / count,
        "top1": float(total["top1_sum"]) / count,
        "top5": float(total["top5_sum"]) / count,
        "examples": count,
    }


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_finite(acc: dict, step: int, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = int(jax.device_get(acc["first_nonfinite_step"]))
    if bad != NO_STEP:
        ckpt.wait()
        last = ckpt.latest_step()
        raise FloatingPointError(
            f"the training loss became NaN/inf at step {bad}; stopped at step {step} without saving. "
            f"The last good checkpoint is step {last}. Lower the learning rate or enable "
            "config.optimizer.grad_clip_norm."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Returns a summary: ``status`` (``finished``, ``preempted`` or ``stopped``),
    ``step``, ``total_steps``, ``eval`` (the final eval metrics, when evaluated),
    ``best_top1``, ``best_step``, ``seconds`` (wall time) split into
    ``first_step_seconds`` (setup and compilation; None if no step ran), ``train_seconds``,
    ``eval_seconds`` and ``checkpoint_seconds``, ``images_per_second`` (training alone: the
    steps after the first over ``train_seconds``), ``workdir``. Process 0 also writes it to
    ``WORKDIR/summary.json`` (``launch/slurm_gpu.sbatch`` reads ``status`` there to requeue
    a job stopped by its time limit).
    """
    t_start = time.time()
    s = setup(config, devices)
    c, pipeline = s.config, s.pipeline
    config_dict = c.to_dict()
    ckpt = ckpt_lib.Checkpointer(workdir, keep=c.keep_checkpoints, async_save=c.async_checkpoints)
    writer = MetricWriter(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _write_json_atomically(os.path.join(workdir, "config.json"), config_dict)

    latest = ckpt.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(ckpt.saved_config(latest), config_dict, workdir)
        abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding)
        state, position = ckpt.restore(latest, abstract)
        log(f"resumed from {ckpt.directory}/{latest} (examples seen per process: {position['examples_seen']})")
    else:
        state = create_state(s)
    start_step = int(jax.device_get(state.step))
    info = pipeline.info
    local_batch = pipeline.local_batch_size
    steps_per_epoch = pipeline.steps_per_epoch
    log(
        f"{c.model.name} on {info.name}: {info.num_train} train / {info.num_eval} eval examples, "
        f"{info.num_classes} classes | {s.mesh.size} devices, {jax.process_count()} processes | "
        f"batch {c.data.batch_size} | {s.total_steps} steps ({steps_per_epoch}/epoch) | "
        f"start at step {start_step}"
    )

    batches = to_global_batches(
        pipeline.train_batches(start_step * local_batch), sharding.batch_sharding(s.mesh), c.data.prefetch
    )
    eval_every = max(1, int(round(c.eval_every_epochs * steps_per_epoch)))
    stop_at = s.total_steps if c.stop_after_steps is None else min(s.total_steps, start_step + c.stop_after_steps)
    acc = _empty_accumulator()
    last_eval: dict[str, float] | None = None
    best = (-1.0, None)
    status = "finished"
    step = start_step
    t_log, images_since_log = time.time(), 0
    t_compile_end = None
    eval_seconds = checkpoint_seconds = 0.0  # the summary's training time leaves these out

    def position(at_step: int) -> dict[str, Any]:
        return {"examples_seen": at_step * local_batch, "epoch": at_step / steps_per_epoch}

    with ckpt_lib.PreemptionWatcher() as watcher:
        while step < stop_at:
            batch = next(batches)
            state, metrics = s.train_step(state, batch)
            step += 1
            acc = _accumulate(acc, metrics, state.step)  # state.step is on the device: no transfer
            images_since_log += c.data.batch_size
            if t_compile_end is None:
                jax.block_until_ready(metrics)
                t_compile_end = time.time()
                log(f"first step (compilation included) took {t_compile_end - t_start:.1f}s since start")
                t_log, images_since_log = time.time(), 0
            is_last = step == s.total_steps
            if step % c.log_every_steps == 0 or is_last or step == stop_at:
                _check_finite(acc, step, ckpt)
                host = jax.device_get(acc)
                n = max(float(host["steps"]), 1.0)
                elapsed = time.time() - t_log
                rate = images_since_log / elapsed if elapsed > 0 and images_since_log else float("nan")
                lr = float(s.schedule(step - 1))
                train_metrics = {
                    "loss": host["loss"] / n, "top1": host["top1"] / n, "top5": host["top5"] / n,
                    "learning_rate": lr, "images_per_second": rate, "epoch": step / steps_per_epoch,
                }
                eta = (s.total_steps - step) * c.data.batch_size / rate if rate == rate and rate > 0 else 0
                log(
                    f"step {step:>6}/{s.total_steps} | epoch {step / steps_per_epoch:6.2f} | "
                    f"loss {train_metrics['loss']:.4f} | top1 {100 * train_metrics['top1']:5.1f}% | "
                    f"lr {lr:.4g} | {rate:8.1f} img/s | ETA {_format_duration(eta)}"
                )
                writer.write(step, "train", train_metrics)
                acc = _empty_accumulator()
                t_log, images_since_log = time.time(), 0
            eval_metrics = None
            if step % eval_every == 0 or is_last:
                t_eval = time.time()
                eval_metrics = evaluate(s, state)
                eval_seconds += time.time() - t_eval
                last_eval = eval_metrics
                if eval_metrics["top1"] > best[0]:
                    best = (eval_metrics["top1"], step)
                log(
                    f"eval  {step:>6} | loss {eval_metrics['loss']:.4f} | top1 {100 * eval_metrics['top1']:.2f}% | "
                    f"top5 {100 * eval_metrics['top5']:.2f}% | {int(eval_metrics['examples'])} examples"
                    + (" (EMA)" if c.ema_decay else "")
                )
                writer.write(step, "eval", eval_metrics)
                writer.flush()
                t_log = time.time()  # eval time does not count against training throughput
            preempted = watcher.requested or ckpt.reached_preemption(step)
            if (
                step % c.checkpoint_every_steps == 0 or is_last or eval_metrics is not None
                or preempted or step == stop_at
            ):
                _check_finite(acc, step, ckpt)
                t_save = time.time()
                ckpt.save(
                    step, state, position(step), config_dict,
                    metrics={"eval_top1": eval_metrics["top1"]} if eval_metrics else None,
                )
                checkpoint_seconds += time.time() - t_save
            if preempted:
                status = "preempted"
                log(f"preemption: checkpoint of step {step} saved; exiting so the job can be restarted")
                break
        else:
            if step < s.total_steps:
                status = "stopped"
    t_wait = time.time()
    ckpt.wait()  # an async save still writing: its time counts as checkpointing
    checkpoint_seconds += time.time() - t_wait
    best_step = ckpt.best_step()
    ckpt.close()
    writer.close()
    t_end = time.time()
    seconds = t_end - t_start
    # Training throughput: the steps after the first (which includes setup and compilation),
    # over the time after it less evaluation and checkpointing.
    timed_steps = max(step - start_step - 1, 0)
    train_seconds = (t_end - t_compile_end - eval_seconds - checkpoint_seconds) if t_compile_end else 0.0
    summary = {
        "status": status,
        "step": step,
        "total_steps": s.total_steps,
        "eval": last_eval,
        "best_top1": best[0] if best[1] is not None else None,
        "best_step": best_step,
        "images_per_second": timed_steps * c.data.batch_size / train_seconds
        if timed_steps and train_seconds > 0 else None,
        "seconds": seconds,
        "first_step_seconds": t_compile_end - t_start if t_compile_end else None,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "checkpoint_seconds": checkpoint_seconds,
        "workdir": workdir,
    }
    if jax.process_index() == 0:
        _write_json_atomically(os.path.join(workdir, "summary.json"), summary)
    _print_summary(summary, c)
    return summary


def _write_json_atomically(path: str, value: dict) -> None:
    """Writes ``value`` to ``path`` via a temporary file and a rename: a reader never sees half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def _print_summary(summary: dict, c: ml_collections.ConfigDict) -> None:
    lines = [
        "",
        "=" * 64,
        f" {c.model.name} on {c.data.name}: {summary['status']} at step {summary['step']}/{summary['total_steps']}",
    ]
    if summary["eval"]:
        e = summary["eval"]
        lines.append(
            f" test accuracy (top-1) {100 * e['top1']:.2f}%   top-5 {100 * e['top5']:.2f}%   "
            f"loss {e['loss']:.4f}   ({int(e['examples'])} examples)"
        )
    if summary["best_step"] is not None:
        lines.append(f" best checkpoint: step {summary['best_step']}")
    ips, first = summary["images_per_second"], summary["first_step_seconds"]
    if first is None:
        lines.append(f" wall time {_format_duration(summary['seconds'])} (no training step ran)")
    else:
        lines.append(
            f" wall time {_format_duration(summary['seconds'])} = first step {first:.1f} s (setup, compilation)"
            f" + training {summary['train_seconds']:.1f} s + eval {summary['eval_seconds']:.1f} s"
            f" + checkpoints {summary['checkpoint_seconds']:.1f} s"
        )
    if ips:
        lines.append(f" training throughput {ips:.0f} images/s (the steps after the first)")
    lines.append(
        f" workdir {summary['workdir']}: checkpoints/, metrics.jsonl, tensorboard/, config.json, summary.json"
    )
    lines.append("=" * 64)
    log("\n".join(lines))
