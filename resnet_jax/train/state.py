"""TrainState: everything a run needs to continue, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """The mutable state of training.

    Attributes:
      step: optimizer steps taken (int32 scalar).
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics (float32).
      opt_state: optax state (momentum buffers, ...).
      ema_params / ema_batch_stats: exponential moving averages used for eval when
        ``ema_decay > 0``; empty dicts otherwise.
      rng: base PRNG key data (uint32[2]); step ``t`` uses ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema_params: PyTree
    ema_batch_stats: PyTree
    rng: jax.Array

    def eval_variables(self, use_ema: bool) -> dict[str, PyTree]:
        """The variables to evaluate with: the EMA ones when enabled."""
        if use_ema:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, seed: int, image_shape: tuple[int, ...], use_ema: bool
) -> TrainState:
    """A fresh state (call under ``jax.jit`` with output shardings to create it sharded)."""
    rng = jax.random.PRNGKey(seed)
    variables = model.init(
        jax.random.fold_in(rng, 0), jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params if use_ema else {},
        ema_batch_stats=batch_stats if use_ema else {},
        rng=jax.random.fold_in(rng, 1),
    )
