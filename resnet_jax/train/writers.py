"""Where metrics go: stdout (a readable line), ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes. TensorBoard events are written with the ``tensorboard``
package's own event writer, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax


class MetricWriter:
    """Appends ``{"step", "split", "time", **metrics}`` to ``WORKDIR/metrics.jsonl`` and
    scalars ``split/name`` to TensorBoard events under ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._events = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self._events = None

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **values}) + "\n")
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v) for k, v in values.items()]
            )
            self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()


def log(message: str) -> None:
    """Prints on process 0 only, flushed (progress must show up in job logs)."""
    if jax.process_index() == 0:
        print(message, flush=True)
