"""Orbax checkpoints of a run: train state, data position and config, saved together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each
checkpoint into a temporary directory and renames it when complete (atomic), in
the background when ``async_checkpoints`` is on; a killed save leaves no
checkpoint that :meth:`Checkpointer.latest_step` would pick. The newest
``keep_checkpoints`` are kept, plus the best by eval top-1.

A run restarted on the same workdir resumes from the newest checkpoint; restoring
takes the target's shardings, so a checkpoint written on N devices restores on M.
A SIGTERM (how Cloud TPU VMs and spot VMs announce preemption) is caught by
:class:`PreemptionWatcher`; the loop then saves and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import jax
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
        return self.manager.save(step, args=args, metrics=metrics, force=True)

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
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync (True on every process once any is told)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


class PreemptionWatcher:
    """Catches SIGTERM so that the loop can save and exit 0 instead of dying mid-step.

    Use as a context manager; ``requested`` turns true after the signal. The
    previous handler is restored on exit.
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
        if threading.current_thread() is threading.main_thread():
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
