"""Multi-process start-up: ``jax.distributed.initialize()`` when the job is multi-process.

JAX finds the coordinator itself on Cloud TPU VMs and under SLURM; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax

_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed() -> bool:
    """True when the environment describes a multi-process job."""
    if os.environ.get("SLURM_NTASKS") and int(os.environ["SLURM_NTASKS"]) <= 1:
        return False
    if os.environ.get("TPU_WORKER_HOSTNAMES") and "," not in os.environ["TPU_WORKER_HOSTNAMES"]:
        return False
    return any(os.environ.get(k) for k in _MULTI_PROCESS_HINTS)


def maybe_initialize() -> None:
    """Initialises the JAX distributed runtime once, if the job is multi-process."""
    if wants_distributed() and not jax.distributed.is_initialized():
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = dict(
                coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]),
            )
        jax.distributed.initialize(**kwargs)
