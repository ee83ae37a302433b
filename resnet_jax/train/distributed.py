"""Multi-process start-up: ``jax.distributed.initialize()`` when the job is multi-process.

JAX finds the coordinator itself on Cloud TPU VMs and under SLURM; elsewhere set
``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``. ``RESNET_JAX_HEARTBEAT_TIMEOUT`` (seconds, default 100) bounds how
long the survivors wait when a process dies before they fail with an error instead
of hanging. On CPU-only hosts the cross-process collectives use gloo.
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
    if not wants_distributed() or jax.distributed.is_initialized():
        return
    kwargs: dict = {"heartbeat_timeout_seconds": int(os.environ.get("RESNET_JAX_HEARTBEAT_TIMEOUT", "100"))}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs.update(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
