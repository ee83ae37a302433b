"""Mixup and CutMix against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data.mixing import cutmix, mix_batch, mixup


def test_mixup_is_a_convex_combination_with_the_rolled_batch():
    x = jnp.arange(4 * 2 * 2 * 1, dtype=jnp.float32).reshape(4, 2, 2, 1)
    t = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
    mx, mt = mixup(x, t, jnp.float32(0.7))
    np.testing.assert_allclose(mx, 0.7 * x + 0.3 * np.roll(x, 1, axis=0), rtol=1e-6)
    np.testing.assert_allclose(mt[1], [0.3, 0.7, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(mt.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_targets_match_the_pasted_area():
    x = jnp.zeros((2, 10, 10, 1)).at[1].set(1.0)  # example 0 receives a box from example 1
    t = jax.nn.one_hot(jnp.array([0, 1]), 2)
    for seed in range(5):
        mx, mt = cutmix(jax.random.key(seed), x, t, jnp.float32(0.6))
        pasted = float(mx[0].mean())  # fraction of example 0 that now comes from example 1
        np.testing.assert_allclose(mt[0], [1 - pasted, pasted], rtol=1e-5, atol=1e-6)


def test_mix_batch_off_is_one_hot_and_on_changes_the_batch():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    y = jnp.arange(8) % 5
    same, targets = mix_batch(jax.random.key(1), x, y, 5)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(targets, jax.nn.one_hot(y, 5))
    mixed, soft = mix_batch(jax.random.key(1), x, y, 5, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert not np.allclose(mixed, x)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
