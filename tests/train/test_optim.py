"""Optimizer, schedules, loss and the train step against closed-form references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.train import optim
from resnet_jax.train.config import base_config
from resnet_jax.train.state import TrainState
from resnet_jax.train.step import cross_entropy, ema_decay_at, train_step


def _config(**changes):
    c = base_config()
    for key, value in changes.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def test_linear_scaling_rule():
    c = _config(**{"optimizer.base_lr": 0.1, "data.batch_size": 1024})
    assert optim.peak_learning_rate(c) == pytest.approx(0.4)
    c.optimizer.scale_lr_with_batch = False
    assert optim.peak_learning_rate(c) == pytest.approx(0.1)


def test_step_schedule_is_the_papers_imagenet_schedule():
    c = _config(**{"schedule.name": "step", "schedule.step_epochs": 30, "data.batch_size": 256})
    sched = optim.create_schedule(c, steps_per_epoch=100, total_steps=9000)
    for step, lr in ((0, 0.1), (2999, 0.1), (3000, 0.01), (5999, 0.01), (6000, 0.001), (8999, 0.001)):
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step


def test_multistep_schedule_is_the_papers_cifar_schedule():
    c = _config(**{"schedule.name": "multistep", "schedule.boundaries": (32000, 48000),
                   "optimizer.scale_lr_with_batch": False})
    sched = optim.create_schedule(c, steps_per_epoch=391, total_steps=64000)
    for step, lr in ((0, 0.1), (31999, 0.1), (32000, 0.01), (47999, 0.01), (48000, 0.001)):
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step
    # ResNet-110: 0.01 until training error < 80% (~400 iterations), then 0.1.
    c.schedule.initial_lr_factor, c.schedule.initial_lr_until_step = 0.1, 400
    sched = optim.create_schedule(c, steps_per_epoch=391, total_steps=64000)
    for step, lr in ((0, 0.01), (399, 0.01), (400, 0.1), (32000, 0.01), (48000, 0.001)):
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step


def test_cosine_with_linear_warmup_closed_form():
    c = _config(**{"schedule.name": "cosine", "schedule.warmup_epochs": 5, "data.batch_size": 512,
                   "optimizer.base_lr": 0.1})
    peak, warmup, total = 0.2, 50, 1000
    sched = optim.create_schedule(c, steps_per_epoch=10, total_steps=total)
    for step in (0, 10, 49, 50, 300, 999):
        if step < warmup:
            ref = peak * step / warmup
        else:
            ref = 0.5 * peak * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
        assert float(sched(step)) == pytest.approx(ref, rel=1e-5, abs=1e-8), step


def test_decay_mask_excludes_batchnorm_and_bias():
    params = {"conv": {"kernel": jnp.ones((3, 3, 4, 8))}, "bn": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
              "fc": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)}}
    mask = optim.decay_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "fc": {"kernel": True, "bias": False}}


def test_label_smoothed_cross_entropy_closed_form():
    logits = jnp.array([[2.0, 0.5, -1.0]])
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert float(cross_entropy(logits, jnp.array([0]), 0.1)[0]) == pytest.approx(-(target * np.log(p)).sum(), rel=1e-6)
    assert float(cross_entropy(logits, jnp.array([1]))[0]) == pytest.approx(-np.log(p[1]), rel=1e-6)


class TwoParameterModel(nn.Module):
    """logits = x * w for a scalar input and two classes: exactly two parameters."""

    @nn.compact
    def __call__(self, x, train: bool):
        w = self.param("w", lambda k: jnp.array([0.3, -0.2]))
        return x[:, :1] * w


def _reference_sgd(w, xs, labels, lrs, momentum, nesterov, wd, mode, smoothing):
    """Hand-written SGD: gradient of the mean smoothed CE of logits x * w."""
    w = np.array(w, np.float64)
    buf = np.zeros_like(w)
    for x, y, lr in zip(xs, labels, lrs):
        logits = x[:, None] * w[None]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        t = np.eye(2)[y] * (1 - smoothing) + smoothing / 2
        g = ((p - t) * x[:, None]).mean(0)
        if mode == "l2":
            g = g + wd * w  # d/dw of wd/2 ||w||^2 added to the loss
        buf = momentum * buf + g
        update = g + momentum * buf if nesterov else buf
        if mode == "decoupled":
            update = update + wd * w
        w = w - lr * update
    return w


@pytest.mark.parametrize("mode,nesterov,smoothing", [("l2", False, 0.0), ("l2", True, 0.1), ("decoupled", False, 0.2)])
def test_train_step_matches_hand_computed_sgd(mode, nesterov, smoothing):
    c = _config(**{
        "optimizer.base_lr": 0.5, "optimizer.scale_lr_with_batch": False, "optimizer.momentum": 0.9,
        "optimizer.nesterov": nesterov, "optimizer.weight_decay": 0.05, "optimizer.weight_decay_mode": mode,
        "schedule.name": "multistep", "schedule.boundaries": (2,), "schedule.decay_factor": 0.1,
    })
    sched = optim.create_schedule(c, steps_per_epoch=1, total_steps=4)
    tx = optim.create_optimizer(c, sched)
    model = TwoParameterModel()
    params = {"w": jnp.array([0.3, -0.2])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       ema_params={}, ema_batch_stats={}, rng=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=4) for _ in range(4)]
    ys = [rng.integers(0, 2, 4) for _ in range(4)]
    for x, y in zip(xs, ys):
        batch = {"image": jnp.asarray(x, jnp.float32)[:, None], "label": jnp.asarray(y, jnp.int32)}
        state, _ = train_step(state, batch, model=model, tx=tx, label_smoothing=smoothing)
    ref = _reference_sgd([0.3, -0.2], xs, ys, [0.5, 0.5, 0.05, 0.05], 0.9, nesterov, 0.05, mode, smoothing)
    np.testing.assert_allclose(np.asarray(state.params["w"]), ref, rtol=1e-5, atol=1e-6)


def test_ema_tracks_params_with_tf_style_warmup():
    c = _config(**{"optimizer.base_lr": 0.5, "optimizer.scale_lr_with_batch": False, "optimizer.momentum": 0.0,
                   "optimizer.weight_decay": 0.0, "schedule.name": "constant"})
    tx = optim.create_optimizer(c, optim.create_schedule(c, 1, 3))
    model = TwoParameterModel()
    params = {"w": jnp.array([0.3, -0.2])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       ema_params=params, ema_batch_stats={}, rng=jax.random.PRNGKey(0))
    ema = np.array([0.3, -0.2])
    for t in range(3):
        batch = {"image": jnp.ones((2, 1)), "label": jnp.array([0, 1])}
        state, _ = train_step(state, batch, model=model, tx=tx, ema_decay=0.99)
        d = min(0.99, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * np.asarray(state.params["w"])
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-6)
    assert float(ema_decay_at(jnp.asarray(10**6), 0.9999)) == pytest.approx(0.9999)


class TwoByOneKernel(nn.Module):
    """logits = x @ K with K of shape (1, 2): a 2-D kernel, so LARS applies its trust ratio."""

    @nn.compact
    def __call__(self, x, train: bool):
        return x[:, :1] @ self.param("kernel", lambda k: jnp.array([[0.3, -0.2]]))


def test_lars_update_closed_form():
    """LARS (You et al. 2017, optax's form): u = trust * (g + wd w) with
    trust = 0.001 ||w|| / ||g + wd w||, scaled by lr, then momentum."""
    c = _config(**{"optimizer.name": "lars", "optimizer.base_lr": 2.0, "optimizer.scale_lr_with_batch": False,
                   "optimizer.momentum": 0.9, "optimizer.weight_decay": 0.01, "schedule.name": "constant"})
    tx = optim.create_optimizer(c, optim.create_schedule(c, 1, 3))
    model = TwoByOneKernel()
    params = {"kernel": jnp.array([[0.3, -0.2]])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       ema_params={}, ema_batch_stats={}, rng=jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    w, buf = np.array([0.3, -0.2], np.float64), np.zeros(2)
    for _ in range(3):
        x, y = rng.normal(size=4), rng.integers(0, 2, 4)
        state, _ = train_step(state, {"image": jnp.asarray(x, jnp.float32)[:, None], "label": jnp.asarray(y, jnp.int32)},
                              model=model, tx=tx)
        logits = x[:, None] * w[None]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = ((p - np.eye(2)[y]) * x[:, None]).mean(0) + 0.01 * w
        buf = 0.9 * buf + 2.0 * (0.001 * np.linalg.norm(w) / np.linalg.norm(g)) * g
        w = w - buf
    np.testing.assert_allclose(np.asarray(state.params["kernel"])[0], w, rtol=1e-5)
