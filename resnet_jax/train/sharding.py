"""The device mesh and the shardings of batches and train state.

One mesh axis, ``data``, over every device of every process. Batches are split
along it; the train state is replicated, or with ``shard_params`` (FSDP-style)
each parameter and optimizer-state array is split along its largest dimension
that divides by the number of devices (small arrays stay replicated). XLA's SPMD
partitioner inserts the collectives; BatchNorm statistics therefore cover the
global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Arrays smaller than this stay replicated under shard_params (not worth a collective).
MIN_SHARDED_SIZE = 2**14


def create_mesh(devices: list | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Several global batches stacked on a new leading axis: that axis whole on every device,
    the batch axis after it split across the data axis (``step.compile_multi_step``)."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest dimension divisible by ``n``; replicate small or indivisible arrays."""
    if not shape or np.prod(shape) < MIN_SHARDED_SIZE or n == 1:
        return P()
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in order:
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, shard_params: bool) -> Any:
    """NamedShardings for every leaf of the train state."""
    n = mesh.shape[DATA_AXIS]

    def leaf(x):
        if not shard_params:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n))

    return jax.tree_util.tree_map(leaf, abstract_state)
