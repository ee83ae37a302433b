"""The generic ResNet: one module whose orthogonal options cover the whole family.

ResNet (He et al. 2015, v1 and v1.5), ResNet-C/D (deep stem, average-pool shortcuts;
He et al. 2019 "Bag of Tricks"), SE-ResNet, ResNeXt, Wide ResNet, ResNet-RS (Bello et
al. 2021) and the CIFAR networks of the paper (three 16/32/64 stages, 3x3 stem,
zero-padding shortcuts; with ``shortcut="none"`` the plain networks) are all this
module with different arguments; :mod:`resnet_jax.models.registry` names them.

Example::

    model = ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck")      # ResNet-50
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)              # (N, 1000) float32
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.blocks import BLOCKS
from resnet_jax.models.layers import (
    BatchNorm,
    Stem,
    conv,
    dense_kernel_init,
    get_activation,
    stage_drop_path_rates,
)

Array = jax.Array
Dtype = Any


class ResNet(nn.Module):
    """A residual network over NHWC images.

    Call: ``model.apply(variables, images, train=..., return_stages=False)`` with
    ``images`` of shape ``(N, H, W, 3)`` (any float dtype; cast to ``dtype``).
    Returns float32 logits ``(N, num_classes)``, or pooled features ``(N, C)`` when
    ``num_classes == 0``. With ``return_stages=True`` returns ``(output, stages)``
    where ``stages`` is a tuple with each stage's output feature map (NHWC, in
    ``dtype``), for use as a backbone. ``train`` selects batch statistics, drop-path
    and dropout (which need a ``"dropout"`` rng) and must be passed explicitly.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block: ``"basic"`` or ``"bottleneck"``.
      widths: base width (planes) of each stage; default (64, 128, 256, 512).
      stem: ``"classic"`` (7x7), ``"deep"`` (3x 3x3) or ``"cifar"`` (one 3x3/1).
      stem_width: channels of the classic/cifar stem, or of the first two deep-stem
        convs (the deep stem outputs ``2 * stem_width``).
      stem_pool: ``"max"``, ``"conv"`` (ResNet-RS strided conv) or ``"none"``.
      stride_on_1x1: v1 (stride on the first 1x1 of a bottleneck) instead of v1.5.
      groups / base_width: ResNeXt cardinality and width per group; Wide ResNet uses
        ``base_width=128``.
      shortcut: ``"projection"`` (option B), ``"avg_down"`` (ResNet-D),
        ``"zero_pad"`` (option A) or ``"none"`` (plain network).
      se_ratio: squeeze-and-excitation ratio (0 disables; timm's SE-ResNets 1/16,
        ResNet-RS 0.25).
      drop_path_rate: stochastic depth of the last block; rises linearly from 0.
      dropout_rate: dropout before the classifier.
      zero_init_last: zero-initialise each block's last BatchNorm scale.
      activation: ``"relu"`` or ``"swish"``.
      bn_momentum / bn_epsilon: BatchNorm running-average decay (flax convention,
        0.9 == PyTorch's 0.1) and epsilon.
      bn_group_size: examples per BatchNorm statistics group in training (ghost
        BatchNorm), None for the whole (global) batch.
      num_classes: classifier outputs; 0 returns pooled features.
      dtype: compute dtype (bfloat16 on accelerators); param_dtype: parameters.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "classic"
    stem_width: int = 64
    stem_pool: str = "max"
    stride_on_1x1: bool = False
    groups: int = 1
    base_width: int = 64
    shortcut: str = "projection"
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_last: bool = True
    activation: str = "relu"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int | None = None
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool, return_stages: bool = False
    ) -> Array | tuple[Array, tuple[Array, ...]]:
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"widths {tuple(self.widths)} and stage_sizes {tuple(self.stage_sizes)} "
                "must have the same length"
            )
        block_cls = BLOCKS.get(self.block)
        if block_cls is None:
            raise ValueError(f"unknown block {self.block!r}; choose one of {sorted(BLOCKS)}")
        conv_f = functools.partial(conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm_f = functools.partial(
            BatchNorm,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            group_size=self.bn_group_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        act = get_activation(self.activation)

        x = jnp.asarray(x, self.dtype)
        x = Stem(self.stem, self.stem_width, self.stem_pool, conv_f, norm_f, act, name="stem")(
            x, train
        )
        stages = []
        rates = stage_drop_path_rates(self.stage_sizes, self.drop_path_rate)
        for i, (size, planes) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                x = block_cls(
                    planes=planes,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv_f,
                    norm=norm_f,
                    act=act,
                    groups=self.groups,
                    base_width=self.base_width,
                    stride_on_1x1=self.stride_on_1x1,
                    se_ratio=self.se_ratio,
                    drop_path_rate=rates[i][j],
                    shortcut=self.shortcut,
                    zero_init_last=self.zero_init_last,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
            stages.append(x)

        out = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes:
            out = nn.Dropout(self.dropout_rate)(out, deterministic=not train or not self.dropout_rate)
            out = nn.Dense(
                self.num_classes,
                kernel_init=dense_kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="fc",
            )(out.astype(self.dtype))
            out = out.astype(jnp.float32)
        if return_stages:
            return out, tuple(stages)
        return out
