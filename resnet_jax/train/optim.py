"""The optax optimizer and learning-rate schedules, decided entirely by the config.

* SGD with momentum (optionally Nesterov), or LARS for very large batches.
* Weight decay ``l2`` (the paper: the gradient of ``wd / 2 * ||w||^2`` is added to
  the loss gradient *before* momentum, which is exactly L2 regularisation of the
  loss) or ``decoupled`` (added after momentum, scaled by the learning rate only,
  as SGDW); ``decay_bn_and_bias=False`` masks out BatchNorm and bias parameters
  (every parameter with fewer than 2 dimensions).
* Schedules (per optimizer step): ``step`` (x ``decay_factor`` every
  ``step_epochs``), ``multistep`` (x ``decay_factor`` at each of ``boundaries``
  steps; the paper's CIFAR: 32k and 48k), ``cosine`` (to 0 at the end), ``constant``;
  all with optional linear warmup from 0.
* Linear scaling: ``lr = base_lr * batch_size / 256`` when ``scale_lr_with_batch``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def peak_learning_rate(config: Any) -> float:
    """``base_lr``, scaled by ``batch_size / 256`` when the config asks for it."""
    lr = config.optimizer.base_lr
    if config.optimizer.scale_lr_with_batch:
        lr *= config.data.batch_size / 256
    return lr


def create_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step."""
    s = config.schedule
    peak = peak_learning_rate(config)
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)
    if s.name == "step":
        boundaries = range(int(s.step_epochs * steps_per_epoch), total_steps, int(s.step_epochs * steps_per_epoch))
        main = optax.piecewise_constant_schedule(peak, {b - warmup: s.decay_factor for b in boundaries})
    elif s.name == "multistep":
        scales = {int(b) - warmup: s.decay_factor for b in s.boundaries}
        if s.initial_lr_until_step:
            scales = {0: s.initial_lr_factor, int(s.initial_lr_until_step) - warmup: 1 / s.initial_lr_factor, **scales}
        main = optax.piecewise_constant_schedule(peak, scales)
    elif s.name == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {s.name!r}; choose step, multistep, cosine or constant")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that are weight-decayed: kernels (ndim >= 2), not BN/bias."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax chain for ``config.optimizer``."""
    o = config.optimizer
    mask = None if o.decay_bn_and_bias else decay_mask
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.name == "lars":
        parts.append(
            optax.lars(
                schedule, weight_decay=o.weight_decay, weight_decay_mask=mask or True,
                trust_ratio_mask=decay_mask, momentum=o.momentum, nesterov=o.nesterov,
            )
        )
        return optax.chain(*parts)
    if o.name != "sgd":
        raise ValueError(f"unknown optimizer {o.name!r}; choose sgd or lars")
    if o.weight_decay_mode not in ("l2", "decoupled"):
        raise ValueError(f"unknown weight_decay_mode {o.weight_decay_mode!r}; choose l2 or decoupled")
    decay = [optax.add_decayed_weights(o.weight_decay, mask)] if o.weight_decay else []
    if o.weight_decay_mode == "l2":
        parts += decay
    if o.momentum:
        parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
    if o.weight_decay_mode == "decoupled":
        parts += decay
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
