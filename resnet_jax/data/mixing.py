"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a global batch, on the device.

They act on batches and labels, so they run inside the jitted train step (pure JAX,
no TensorFlow): each example is mixed with its neighbour in a rolled batch, with one
``lam ~ Beta(alpha, alpha)`` per batch. With both enabled, each batch uses one of the
two with equal probability (as timm's ``switch_prob=0.5``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``lam * x + (1 - lam) * roll(x)`` for images and one-hot targets."""
    mixed = lam * images.astype(jnp.float32) + (1 - lam) * jnp.roll(images, 1, axis=0).astype(jnp.float32)
    return mixed.astype(images.dtype), lam * targets + (1 - lam) * jnp.roll(targets, 1, axis=0)


def cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pastes a box of area ``1 - lam`` from the rolled batch; targets weighted by the
    box's actual (clipped) area."""
    _, h, w, _ = images.shape
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, h)
    cx = jax.random.randint(kx, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows = (jnp.arange(h) >= y0) & (jnp.arange(h) < y1)
    cols = (jnp.arange(w) >= x0) & (jnp.arange(w) < x1)
    box = (rows[:, None] & cols[None, :])[None, :, :, None]
    mixed = jnp.where(box, jnp.roll(images, 1, axis=0), images)
    kept = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
    return mixed, kept * targets + (1 - kept) * jnp.roll(targets, 1, axis=0)


def mix_batch(
    rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
    mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """``(images, soft targets (N, num_classes) float32)`` after mixup and/or CutMix."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if not mixup_alpha and not cutmix_alpha:
        return images, targets
    k_choice, k_mix, k_cut, k_box = jax.random.split(rng, 4)
    mixed_up = mixup(images, targets, jax.random.beta(k_mix, mixup_alpha, mixup_alpha)) if mixup_alpha else None
    cut = cutmix(k_box, images, targets, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)) if cutmix_alpha else None
    if mixed_up is None:
        return cut
    if cut is None:
        return mixed_up
    use_cut = jax.random.bernoulli(k_choice)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(use_cut, a, b), cut, mixed_up)
