"""Pure train and eval steps: ``(state, batch) -> (state, metrics)``.

They close over static objects only (the model, the optax transformation, a few
floats) and are jitted once by :func:`compile_steps` with explicit shardings and
the state donated (:data:`DONATE_STATE`). Loss, softmax and metrics are computed in
float32 whatever the compute dtype. Metrics stay on the device; the loop reads them at log steps.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax.data.mixing import mix_batch
from resnet_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Whether ``compile_steps``' train step updates the state in place (``donate_argnums``); False is a
# candidate the device has not yet timed (docs/performance.md, change 20). Donated, XLA adds
# copy kernels for ResNet-50 on the H100, 136 per step (0.35 GiB): each conv weight and its momentum
# are updated from a gradient read transposed (cuDNN's filter layout), which XLA will not write over
# in place, so the result is written to a temporary and copied into the donated buffer; 32 more copy
# BatchNorm biases. Not donated (False), the new state goes to fresh buffers with no copies, and
# the old one is freed when the caller drops it: peak memory grows by about the parameters' size
# (+0.16 GiB for ResNet-50). The results are the same either way. (``compile_multi_step``'s loop
# has no such copies and donates regardless.)
DONATE_STATE = True
# A candidate, off until the device times it (docs/performance.md, change 21): with the state
# donated, the weight gradients are laid out as the parameters are (row-major, HWIO for a conv
# kernel) before the optimizer reads them (:func:`grads_in_param_layout`), so that each update is an
# elementwise kernel that XLA runs in place in the donated buffers: the copies DONATE_STATE's note
# describes become one bf16 transpose per conv weight (4 bytes moved per element instead of 16;
# ResNet-50 on the H100: 910 -> 858 kernels, and the several-steps loop 914 -> 862 per step). Not
# applied where the state is not donated, whose update writes fresh buffers with no copies.
GRADS_IN_PARAM_LAYOUT = False


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0, targets: jax.Array | None = None
) -> jax.Array:
    """Per-example softmax cross-entropy in float32 with uniform label smoothing.

    The smoothed target is ``(1 - s) * one_hot + s / num_classes``; ``targets``
    (soft, e.g. from mixup) replaces ``one_hot(labels)`` when given.
    """
    logits = logits.astype(jnp.float32)
    if targets is None:
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where ``labels`` is among the ``k`` largest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """``min(decay, (1 + t) / (10 + t))``: tf.train.ExponentialMovingAverage with
    ``num_updates`` (as ResNet-RS), so early averages are not dominated by the init."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def grads_in_param_layout(grads: Any) -> Any:
    """``grads`` with every array of two or more dimensions constrained to the row-major device
    layout (``jax.experimental.layout``), the parameters' own; the values are unchanged. A
    convolution's weight gradient otherwise stays in the layout the backward convolution wrote it
    in (cuDNN's OHWI for an HWIO kernel), and XLA, which will not update a donated buffer in place
    from an operand it reads transposed, writes the update to a temporary and copies it over."""
    from jax.experimental.layout import Layout, with_layout_constraint  # names since mid-2025's jax

    def constrain(g: jax.Array) -> jax.Array:
        return with_layout_constraint(g, Layout(major_to_minor=tuple(range(g.ndim)))) if g.ndim >= 2 else g

    return jax.tree_util.tree_map(constrain, grads)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    param_layout_grads: bool = False,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on a global batch ``{"image": (N,H,W,C), "label": (N,)}``.

    Returns the new state and the step's metrics: ``loss`` (mean, before weight
    decay), ``top1``, ``top5`` (fractions of the batch) and ``nonfinite`` (1.0 if the
    loss is NaN/inf; the loop stops the run then). ``param_layout_grads``: the gradients
    pass through :func:`grads_in_param_layout` before the optimizer (for a donated state;
    the same values, fewer kernels on a GPU).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    images, targets = batch["image"], None
    if mixup_alpha or cutmix_alpha:
        num_classes = model.num_classes
        images, targets = mix_batch(
            jax.random.fold_in(rng, 1), images, batch["label"], num_classes, mixup_alpha, cutmix_alpha
        )

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing, targets).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if param_layout_grads:
        grads = grads_in_param_layout(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_decay:
        step_size = 1.0 - ema_decay_at(state.step, ema_decay)
        ema_params = optax.incremental_update(params, ema_params, step_size)
        ema_batch_stats = optax.incremental_update(batch_stats, ema_batch_stats, step_size)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_batch_stats=ema_batch_stats,
    )
    metrics = {
        "loss": loss,
        "top1": topk_correct(logits, batch["label"], 1).mean(),
        "top5": topk_correct(logits, batch["label"], 5).mean(),
        "nonfinite": (~jnp.isfinite(loss)).astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module, use_ema: bool = False) -> Metrics:
    """Sums over the real (``mask == 1``) examples of a padded eval batch.

    Returns ``loss_sum``, ``top1_sum``, ``top5_sum`` and ``count``; divide by
    ``count`` after summing over all batches.
    """
    logits = model.apply(state.eval_variables(use_ema), batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "top1_sum": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
        "top5_sum": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }


def compile_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    state_sharding: Any,
    batch_sharding: jax.sharding.NamedSharding,
    replicated: jax.sharding.NamedSharding,
    label_smoothing: float,
    ema_decay: float,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
) -> tuple[Any, Any]:
    """``jax.jit``-wrapped train and eval steps with explicit shardings; the train step's state
    donated (updated in place) unless :data:`DONATE_STATE` is off, its gradients in the
    parameters' layout where :data:`GRADS_IN_PARAM_LAYOUT` is on and the state donated."""
    train = jax.jit(
        functools.partial(
            train_step, model=model, tx=tx, label_smoothing=label_smoothing, ema_decay=ema_decay,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
            param_layout_grads=GRADS_IN_PARAM_LAYOUT and DONATE_STATE,
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if DONATE_STATE else (),
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, use_ema=bool(ema_decay)),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=replicated,
    )
    return train, evaluate


def compile_multi_step(
    train: Any,
    state_sharding: Any,
    stacked_batch_sharding: jax.sharding.NamedSharding,
    replicated: jax.sharding.NamedSharding,
) -> Any:
    """Several optimizer steps in one dispatch: ``(state, batches) -> (state, metrics)``.

    ``train`` is the jitted step from :func:`compile_steps`; ``batches`` holds k global
    batches stacked on a new leading axis (``{"image": (k, N, H, W, C), "label": (k, N)}``,
    sharded by :func:`resnet_jax.train.sharding.stacked_batch_sharding`), and every metric
    comes back with that leading axis of k. The k steps run under ``jax.lax.scan`` in one
    compiled program, state donated: the same updates as k calls of ``train``, with one host
    dispatch instead of k (issue 6's "several steps per dispatch"; ``resnet-jax benchmark
    --steps-per-dispatch K`` times it). Donated whatever :data:`DONATE_STATE` says: the loop
    updates its carried state without the copies that flag avoids, and not donating it would
    copy the whole state into the loop at each call instead.
    """
    return jax.jit(
        lambda state, batches: jax.lax.scan(train, state, batches),
        in_shardings=(state_sharding, stacked_batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
