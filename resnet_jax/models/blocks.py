"""Residual blocks: ``BasicBlock`` (two 3x3) and ``Bottleneck`` (1x1-3x3-1x1).

Both take the same options so that the generic :class:`~resnet_jax.models.resnet.ResNet`
can swap them: stride placement (v1 / v1.5), groups and base width (ResNeXt, Wide
ResNet), squeeze-and-excitation, stochastic depth, the shortcut kind (projection,
ResNet-D average-pool, the paper's zero-padding option A, or none for the plain
networks of the degradation experiment) and a zero-initialised last BatchNorm.

Parameter names follow torchvision/timm (``conv1``, ``bn1``, ..., ``se/fc1``,
``downsample/conv``, ``downsample/bn``) so that a state_dict maps one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from resnet_jax.models import layers
from resnet_jax.models.layers import Conv1x1Kernel, Shortcut, ShortcutProjection, SqueezeExcite, conv_param_dtype

Array = jax.Array
Dtype = Any

# A candidate, off until the device times it (docs/performance.md, change 9): in training, a
# Bottleneck's bn2 + ReLU, conv3 and bn3's statistics as one call
# (``layers.BatchNorm(..., conv1x1_kernel=...)``: on an NVIDIA GPU one Pallas kernel). The
# parameters are the same either way; benchmarks patch this to time it.
FUSE_BN2_CONV3 = False
# A candidate, off until the device times it (docs/performance.md, change 10): in training, a
# Bottleneck's conv1 (1x1, stride 1) sums bn1's statistics as it stores its output
# (``layers.BatchNorm(..., input_conv1x1_kernel=...)``: on an NVIDIA GPU one Pallas kernel), so
# bn1 does not read it an extra time. The parameters are the same either way.
FUSE_CONV1_BN1 = False
# A candidate, off until the device times it (docs/performance.md, change 11): with
# FUSE_BN2_CONV3, bn3 is computed in the same op (``BatchNorm(..., next_norm=...)``), so that on
# an NVIDIA GPU conv3's two backward GEMMs compute bn3's input gradient as they load its output
# gradient instead of reading it stored. The parameters are the same either way.
FUSE_BN3 = False
# A candidate, off until the device times it (docs/performance.md, change 16): with FUSE_BN3, the
# residual add and ReLU after bn3 join the same op (``BatchNorm(..., residual=...)``), so that on an
# NVIDIA GPU bn3 is applied in conv3's GEMM epilogue and z is never stored (bn3's statistics from
# the GEMM input's y^T y; its backward pass is ``pallas_fused_conv.gram_backward``). Only where the
# shortcut is the identity (XLA applies a projection's BatchNorm in the add's own kernel) and meets
# bn3 directly (no squeeze-and-excitation, no stochastic depth). The parameters are the same either
# way.
FUSE_RESIDUAL = False
# A candidate, off until the device times it (docs/performance.md, change 17): with FUSE_RESIDUAL, a
# Bottleneck whose shortcut is a projection (or ResNet-D's avg_down) hands it to the same op
# unapplied (``Shortcut(..., deferred=True)``), so that on an NVIDIA GPU conv3's GEMM also computes
# the shortcut's 1x1 convolution, and applies both BatchNorms, adds and applies the ReLU as it
# stores the block's output: neither convolution's output is stored (both BatchNorms' statistics
# from Gram matrices of the GEMMs' inputs). The parameters are the same either way.
FUSE_PROJECTION = False


class _Block(nn.Module):
    """Options common to both blocks.

    Attributes:
      planes: base width of the block; the output has ``planes * expansion`` channels.
      strides: spatial stride of the block (1 or 2).
      conv: conv factory (``layers.conv`` with dtype bound).
      norm: BatchNorm factory (``layers.BatchNorm`` with momentum, epsilon, dtype bound).
      act: activation function.
      groups: grouped-conv groups of the 3x3 conv (ResNeXt cardinality).
      base_width: width per group at ``planes=64`` (64 plain, 4 for ResNeXt-32x4d,
        128 for Wide ResNet-50-2).
      stride_on_1x1: put the stride on the first 1x1 conv (v1, the original paper)
        instead of the 3x3 (v1.5, torchvision). Bottleneck only.
      se_ratio: squeeze-and-excitation reduction ratio of the output channels, or 0.
      drop_path_rate: stochastic-depth probability of dropping the residual branch.
      shortcut: ``projection``, ``avg_down``, ``zero_pad`` (used when the shape
        changes; identity otherwise) or ``none`` (no shortcut at all: plain network).
      zero_init_last: initialise the last BatchNorm scale to zero.
    """

    planes: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[Array], Array]
    groups: int = 1
    base_width: int = 64
    stride_on_1x1: bool = False
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    shortcut: str = "projection"
    zero_init_last: bool = True

    expansion = 1

    def residual(self, x: Array, train: bool, shortcut: Array | ShortcutProjection | None = None) -> Array:
        """The residual branch of x; with ``shortcut`` (the identity's x, or a projection not yet
        applied), ``act(branch + shortcut)``, the block's output (only where :meth:`takes_shortcut`)."""
        raise NotImplementedError

    def takes_shortcut(self, train: bool) -> bool:
        """Whether :meth:`residual` adds the shortcut itself (one op with its last layers)."""
        return False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out_features = self.planes * self.expansion
        identity = self.strides == 1 and x.shape[-1] == out_features
        tail_takes_shortcut = (self.shortcut != "none" and not self.se_ratio and not self.drop_path_rate
                               and self.takes_shortcut(train))
        # (without FUSE_PROJECTION a projection's output is left to XLA, which applies its
        # BatchNorm in the add's kernel: handing it to the op would store it and read it back)
        deferred = (tail_takes_shortcut and not identity and FUSE_PROJECTION
                    and self.shortcut in ("projection", "avg_down"))
        subsampled = None
        if (not identity and layers.SUBSAMPLE_GRAD_IN_PLACE
                and layers.shortcut_subsamples(self.shortcut, self.strides, train, deferred)):
            # the residual branch and the shortcut read x through one op (change 23)
            x, subsampled = layers.subsample_fanout(x, self.strides)
        if tail_takes_shortcut:
            if identity:
                return self.residual(x, train, shortcut=x)
            if deferred:
                projection = Shortcut(self.shortcut, out_features, self.strides, self.conv, self.norm,
                                      name="downsample")(x, train, deferred=True, subsampled=subsampled)
                return self.residual(x, train, shortcut=projection)
        y = self.residual(x, train)
        if self.se_ratio:
            y = SqueezeExcite(self.se_ratio, dtype=y.dtype, name="se")(y)
        if self.drop_path_rate:
            # Per-example drop of the whole branch, rescaled by 1 / (1 - rate).
            y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
                y, deterministic=not train
            )
        if self.shortcut == "none":
            return self.act(y)
        if not identity:
            x = Shortcut(
                self.shortcut, out_features, self.strides, self.conv, self.norm, name="downsample"
            )(x, train, subsampled=subsampled)
        return self.act(y + x.astype(y.dtype))


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR networks); expansion 1."""

    expansion = 1

    def residual(self, x: Array, train: bool, shortcut: Array | ShortcutProjection | None = None) -> Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        y = self.conv(self.planes, 3, self.strides, name="conv1")(x)
        y = self.norm(name="bn1", activation=self.act)(y, train)
        y = self.conv(self.planes, 3, 1, name="conv2")(y)
        return self.norm(name="bn2", zero_init_scale=self.zero_init_last)(y, train)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped), 1x1 expand (ResNet-50 and deeper); expansion 4."""

    expansion = 4

    def takes_shortcut(self, train: bool) -> bool:
        return FUSE_RESIDUAL and FUSE_BN3 and FUSE_BN2_CONV3 and train

    def residual(self, x: Array, train: bool, shortcut: Array | ShortcutProjection | None = None) -> Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        s1, s3 = (self.strides, 1) if self.stride_on_1x1 else (1, self.strides)
        if FUSE_CONV1_BN1 and train and s1 == 1:
            kernel = Conv1x1Kernel(width, conv_param_dtype(self.conv), name="conv1")(x.shape[-1])
            y = self.norm(name="bn1", activation=self.act)(x, train, input_conv1x1_kernel=kernel)
        else:
            y = self.conv(width, 1, s1, name="conv1")(x)
            y = self.norm(name="bn1", activation=self.act)(y, train)
        y = self.conv(width, 3, s3, groups=self.groups, name="conv2")(y)
        if FUSE_BN2_CONV3 and train:
            kernel = Conv1x1Kernel(self.planes * self.expansion, conv_param_dtype(self.conv), name="conv3")(width)
            if FUSE_BN3:
                bn3 = self.norm(name="bn3", zero_init_scale=self.zero_init_last)
                return self.norm(name="bn2", activation=self.act)(y, train, conv1x1_kernel=kernel, next_norm=bn3,
                                                                  residual=shortcut)
            y, statistics = self.norm(name="bn2", activation=self.act)(y, train, conv1x1_kernel=kernel)
            return self.norm(name="bn3", zero_init_scale=self.zero_init_last)(y, train, statistics=statistics)
        y = self.norm(name="bn2", activation=self.act)(y, train)
        y = self.conv(self.planes * self.expansion, 1, 1, name="conv3")(y)
        return self.norm(name="bn3", zero_init_scale=self.zero_init_last)(y, train)


BLOCKS: dict[str, type[_Block]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
