"""Peer anchor: a plain Flax linen ResNet training step (the architecture of flax's examples/imagenet).

The peer that issue 6 names as the fastest (5,644 images/s for ResNet-50 at batch 256
in bf16 on an H100 under jax 0.11): what a user gets from flax's own example, so our
ratio against it says what resnet-jax adds. Written here from that example's design,
not imported (flax does not ship it):

- ``nn.Conv`` without bias, ``nn.BatchNorm`` (momentum 0.9, epsilon 1e-5, statistics
  over the whole batch), ``nn.relu``, ``nn.max_pool`` 3x3/2 ``'SAME'``; bottleneck
  blocks with the stride on the 3x3 (ResNet v1.5), a 1x1 projection shortcut, the last
  BatchNorm of each block zero-initialised; global average pool, ``nn.Dense``;
- compute in ``--dtype``, parameters in float32;
- the step: softmax cross-entropy + 1e-4 / 2 x the squared L2 norm of the kernels (the
  example's weight decay, in the loss), SGD with Nesterov momentum 0.9 (optax), the
  state donated, loss and accuracy returned as metrics.

On a GPU, prints one JSON line like ``peer_torchvision.py``'s (images/s as the median
of timed windows, step time, compile time, peak device memory). Run it in the same
device call as ``resnet-jax benchmark``:

    python3 benchmarks/peer_flax.py --model resnet50 --batch-size 256

``benchmarks/gpu_compile_report.py --peer flax`` compiles the same step for an H100
without one (:func:`abstract_step`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

STAGES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}
WEIGHT_DECAY = 1e-4


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""

    filters: int
    strides: int
    bottleneck: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.bottleneck:
            y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
            y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
            y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(4 * self.filters, (1, 1))(y))
        else:
            y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
            y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm(name="norm_proj")(self.conv(y.shape[-1], (1, 1), self.strides, name="conv_proj")(x))
        return nn.relu(x + y)


class PlainResNet(nn.Module):
    """flax examples/imagenet's ResNet: NHWC images in, logits (N, num_classes) in ``dtype`` out."""

    stage_sizes: Sequence[int]
    bottleneck: bool
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = Block(64 * 2**i, 2 if i > 0 and j == 0 else 1, self.bottleneck, conv, norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def make_model(model: str, dtype: str = "bfloat16", num_classes: int = 1000) -> PlainResNet:
    """The plain Flax ResNet called ``model`` (resnet18/34/50/101/152)."""
    if model not in STAGES:
        raise SystemExit(f"peer_flax: no plain Flax {model!r}; choose one of {', '.join(STAGES)}")
    stages, bottleneck = STAGES[model]
    return PlainResNet(stages, bottleneck, num_classes, jnp.dtype(dtype))


def make_train_step(model: PlainResNet, learning_rate: float = 0.1) -> tuple[Callable, optax.GradientTransformation]:
    """The example's train step, jitted with the state (params, batch_stats, opt_state) donated."""
    tx = optax.sgd(learning_rate, momentum=0.9, nesterov=True)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
            logits, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], mutable=["batch_stats"]
            )
            one_hot = jax.nn.one_hot(batch["label"], logits.shape[-1])
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot).mean()
            l2 = sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params) if p.ndim > 1)
            return loss + WEIGHT_DECAY * 0.5 * l2, (updates["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, {
            "loss": loss, "accuracy": accuracy}

    return jax.jit(train_step, donate_argnums=(0,)), tx


def init_state(model: PlainResNet, tx: optax.GradientTransformation, image_size: int, seed: int = 0) -> dict:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3), model.dtype), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"])}


def abstract_step(model: str, batch_size: int, image_size: int, dtype: str, device: Any) -> tuple[Callable, dict, dict]:
    """(jitted step, abstract state, abstract batch) on ``device``, to ``.lower(state, batch).compile()``."""
    net = make_model(model, dtype)
    step, tx = make_train_step(net)
    on_device = jax.sharding.SingleDeviceSharding(device)
    state = jax.eval_shape(lambda: init_state(net, tx, image_size))
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device), state)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.dtype(dtype), sharding=on_device),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=on_device),
    }
    return step, state, batch


def measure(model: str, batch_size: int, image_size: int, dtype: str, steps: int, windows: int = 5,
            warmup: int = 10) -> dict:
    """Compiles and times the step on the first device; the dict is the JSON line printed."""
    net = make_model(model, dtype)
    step, tx = make_train_step(net)
    state = init_state(net, tx, image_size)
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = {
        "image": jax.random.normal(k1, (batch_size, image_size, image_size, 3), jnp.dtype(dtype)),
        "label": jax.random.randint(k2, (batch_size,), 0, 1000),
    }
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    per_window = max(1, steps // windows)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        rates.append(per_window * batch_size / (time.perf_counter() - t0))
    stats = jax.local_devices()[0].memory_stats() or {}
    median = statistics.median(rates)
    return {
        "peer": f"flax.{model} plain (examples/imagenet)",
        "device": jax.local_devices()[0].device_kind,
        "jax": jax.__version__,
        "batch_size": batch_size,
        "image_size": image_size,
        "dtype": dtype,
        "images_per_s": round(median, 1),
        "images_per_s_min": round(min(rates), 1),
        "images_per_s_max": round(max(rates), 1),
        "step_ms": round(1e3 * batch_size / median, 2),
        "compile_seconds": round(compile_seconds, 1),
        "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None,
        "final_loss": float(metrics["loss"]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", choices=sorted(STAGES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=100, help="timed steps, split into 5 windows")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.model, a.batch_size, a.image_size, a.dtype, a.steps)), flush=True)


if __name__ == "__main__":
    main()
