"""Parameter counts and multiply-add counts, computed abstractly (no real initialisation).

Both use ``jax.eval_shape``, so even ResNet-RS-420 is measured in about a second
without allocating its weights. Multiply-adds count convolutions and the classifier
(the layers the paper's Table 1 counts); BatchNorm, activations, pooling and
additions are left out, as in the paper and in fvcore/ptflops-style tables.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


def abstract_variables(model: nn.Module, image_size: int, batch: int = 1) -> PyTree:
    """The model's variables as ``ShapeDtypeStruct``s, without computing them."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def model_params(model: nn.Module, image_size: int = 64) -> int:
    """Trainable parameters (the ``params`` collection; BatchNorm statistics excluded)."""
    return count_params(abstract_variables(model, image_size)["params"])


def model_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of one forward pass of one ``image_size`` x ``image_size`` image.

    A convolution costs ``H_out * W_out * C_out * k_h * k_w * C_in / groups``; a
    dense layer ``C_in * C_out``.
    """
    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            in_features = args[0].shape[-1]
            if isinstance(module, nn.Conv):
                kernel = math.prod(module.kernel_size)
                per_output = kernel * in_features // module.feature_group_count
            else:
                per_output = in_features
            total += math.prod(out.shape[1:]) * per_output
        return out

    x = jnp.zeros((1, image_size, image_size, 3))
    with nn.intercept_methods(count):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return total
