"""Orbax checkpoints of a run: train state, data position and config, saved together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each
checkpoint into a temporary directory and renames it when complete (atomic), in
the background when ``async_checkpoints`` is on; a killed save leaves no
checkpoint that :meth:`Checkpointer.latest_step` would pick. The newest
``keep_checkpoints`` are kept, plus the best by eval top-1.

A run restarted on the same workdir resumes from the newest checkpoint; restoring
takes the target's shardings, so a checkpoint written on N devices restores on M.
A SIGTERM (how Cloud TPU VMs and spot VMs announce preemption) is caught by
:class:`PreemptionWatcher` in a single-process run, and by JAX's preemption service in
a multi-process one, which makes every process save the same step even when only one
of them was signalled; the loop then saves and exits cleanly.

A save that cannot be written (a full disk, no permission) raises
:class:`CheckpointWriteError` naming the step, the directory and the cause.
Before each save on a local filesystem the free space is compared with the
checkpoint's size, so a full disk is usually refused before a byte is written;
a write that fails part-way has its temporary directory removed. Either way the
complete checkpoints already in the workdir are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class _NoMetricsWarningFilter(logging.Filter):
    """Orbax warns on every save without eval metrics; those saves are intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsWarningFilter())

# Config fields that change the shapes or structure of the saved state.
SHAPE_FIELDS = (
    "model.name",
    "model.num_classes",
    "model.overrides",
    "data.name",
    "data.num_classes",
    "optimizer.name",
    "optimizer.momentum",
    "ema_decay",
)


class IncompatibleCheckpointError(ValueError):
    """The workdir holds checkpoints of a config whose state has another shape."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); earlier ones are intact."""


# Room required beyond the arrays: a fixed amount (JSON items, filesystem blocks), a
# fraction of the array bytes, and an allowance per array for Orbax's per-array metadata
# and the OCDBT b-tree. Orbax keeps the b-tree in one node, with the arrays of 1 KB or less
# inline (about 280 bytes per array here), and OCDBT never rewrites in place: each commit of
# a batch of writes adds a new copy of that node. How many commits a save makes depends on
# how the asynchronous writes happen to batch: on a 2-core machine, 0.8-1 KB per array in
# all when idle, 1.3-4 KB with three saves at once, 5.3 KB once under the full test suite.
# 6 KB covers those; the rare save that needs more fails part-way with ENOSPC and is
# cleaned up (Checkpointer._write_errors), the earlier checkpoints intact. For ResNet-50's
# state (698 arrays, 307 MB) the per-array allowance adds 4 MB (1.4%), all three margins 11 MB.
# tensorstore's compression usually keeps large checkpoints under their array bytes.
SPACE_MARGIN_BYTES = 256 << 10
SPACE_MARGIN_FRACTION = 0.02
SPACE_MARGIN_PER_ARRAY = 6 << 10
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def checkpoint_bytes(state: Any) -> int:
    """Bytes the arrays of ``state`` take in one checkpoint (each shard counted once)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state)))


def space_needed(state: Any) -> int:
    """Free bytes required before saving ``state``: its arrays plus the margins above."""
    arrays = len(jax.tree_util.tree_leaves(state))
    return (
        int(checkpoint_bytes(state) * (1 + SPACE_MARGIN_FRACTION))
        + SPACE_MARGIN_BYTES
        + SPACE_MARGIN_PER_ARRAY * arrays
    )


def _os_error_code(exc: BaseException) -> int | None:
    """The errno behind ``exc`` or its causes: OSError, or tensorstore's ``os_error_code='N'``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        match = re.search(r"os_error_code='?(\d+)", str(exc))
        if match:
            return int(match.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _quiet_orphaned_save_callbacks() -> None:
    """After a failed save, tensorstore still completes the orphaned writes of Orbax's
    closed event loop; each would print a traceback ('Event loop is closed', 'exception
    was never retrieved') after our error. Those say nothing new, so they are dropped."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _shape_signature(config: dict, field: str) -> Any:
    value = _get(config, field)
    if field in ("optimizer.momentum", "ema_decay"):
        return bool(value)  # only on/off changes the state's structure
    if field == "data.num_classes" and _get(config, "data.name") != "fake":
        return None
    return value


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Raises :class:`IncompatibleCheckpointError` naming every field that differs."""
    saved, current = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(current, default=str))
    diffs = [
        f"{f}: checkpoint has {_get(saved, f)!r}, config has {_get(current, f)!r}"
        for f in SHAPE_FIELDS
        if _shape_signature(saved, f) != _shape_signature(current, f)
    ]
    if diffs:
        raise IncompatibleCheckpointError(
            f"{workdir} holds checkpoints of a different model/optimizer ("
            + "; ".join(diffs)
            + "). Use a new --workdir, or set these fields back to resume. Nothing was changed."
        )


class Checkpointer:
    """Saves and restores ``(state, data position, config)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda m: m["eval_top1"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=async_save,
            save_decision_policy=policies.FixedIntervalPolicy(1),
            best_fn=lambda m: m["eval_top1"],  # for best_step(); preservation is set above
            best_mode="max",
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        self._last_step: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        data_position: dict[str, Any],
        config: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts saving (asynchronously when enabled); every process must call it."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position),
            config=ocp.args.JsonSave(config),
        )
        self._last_step = step
        with self._write_errors(step):
            self.manager.wait_until_finished()  # Orbax's save() waits for the previous one anyway
            self._check_free_space(step, state)
            return self.manager.save(step, args=args, metrics=metrics, force=True)

    def _check_free_space(self, step: int, state: Any) -> None:
        """Refuses the save before writing anything when the filesystem lacks room for it."""
        path = os.fspath(self.directory)
        if "://" in path:  # gs:// and other object stores: no free-space figure to read
            return
        needed = space_needed(state)
        free = shutil.disk_usage(path).free
        if jax.process_count() > 1:  # Orbax needs one shared directory: all processes decide alike
            from jax.experimental import multihost_utils

            free_mib = np.asarray(min(free >> 20, 2**31 - 1), np.int32)  # int32: jax has no x64 by default
            free = int(np.min(multihost_utils.process_allgather(free_mib))) << 20
        if free < needed:
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"not enough disk space to save the checkpoint of step {step} in {path}: it needs about "
                f"{_megabytes(needed)}, {_megabytes(free)} is free. Nothing was written. "
                + self._recovery_hint(),
            )

    def _newest_complete_step(self) -> int | None:
        """Newest finished checkpoint on disk (the manager may already list a failed one)."""
        path = os.fspath(self.directory)
        if "://" in path:
            return self.manager.latest_step()
        steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
        return max(steps, default=None)

    def _recovery_hint(self) -> str:
        latest = self._newest_complete_step()
        return (
            f"The newest complete checkpoint, step {latest}, is untouched; after freeing space "
            "(or lowering config.keep_checkpoints, or moving --workdir to a larger disk) run the same "
            f"command again to resume from step {latest}."
            if latest is not None
            else "There is no earlier checkpoint; free space or choose a --workdir on a larger disk."
        )

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """Turns an OS-level write failure (here or from an earlier async save) into a
        :class:`CheckpointWriteError` and removes the partial temporary directories."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:  # Orbax/tensorstore raise ValueError carrying the OS error code
            code = _os_error_code(e)
            if code is None:
                raise
            _quiet_orphaned_save_callbacks()
            failed = self._remove_partial_saves()
            steps = ", ".join(failed) if failed else str(step if step is not None else "?")
            raise CheckpointWriteError(
                code,
                f"could not write the checkpoint of step {steps} in {self.directory}: "
                f"{os.strerror(code)} (errno {code}). The partial files were removed. " + self._recovery_hint(),
            ) from e

    def _remove_partial_saves(self) -> list[str]:
        """Deletes ``<step>.orbax-checkpoint-tmp*`` directories; returns their steps."""
        path = os.fspath(self.directory)
        if "://" in path or not os.path.isdir(path):
            return []
        steps = []
        for name in sorted(os.listdir(path)):
            if _TMP_SUFFIX in name:
                steps.append(name.split(".")[0])
                if jax.process_index() == 0:
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        return steps

    def saved_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the state onto ``abstract_state``'s shardings (``ShapeDtypeStruct`` leaves
        with ``sharding``), and the data position."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete (raising their write errors)."""
        with self._write_errors(self._last_step):
            self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync (True on every process once any is told)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def jax_preemption_sync_active() -> bool:
    """True in a multi-process job whose JAX preemption service is on.

    Then JAX's own SIGTERM notifier (installed by ``jax.distributed.initialize``) tells
    the coordination service, and :meth:`Checkpointer.reached_preemption` turns true on
    every process at the same step, however many of them got the signal.
    """
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatcher:
    """Catches SIGTERM so that the loop can save and exit 0 instead of dying mid-step.

    Use as a context manager; ``requested`` turns true after the signal. The
    previous handler is restored on exit.

    In a multi-process job with JAX's preemption service (the default) no Python
    handler is installed: it would replace JAX's notifier, and a process that acted on
    its own signal would save alone while its peers wait in the next step's collective
    (a hang). The loop then relies on :meth:`Checkpointer.reached_preemption`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame):  # noqa: ARG002
        print(f"received signal {signum}: saving a checkpoint and stopping", flush=True)
        self._event.set()

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread() and not jax_preemption_sync_active():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying the target shardings, for :meth:`Checkpointer.restore`."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
