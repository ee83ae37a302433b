"""Building parts shared by every ResNet: conv/norm factories, BatchNorm, SE, stems, shortcuts.

Layout is NHWC throughout (what XLA prefers on TPU and GPU). Convolutions use
explicit symmetric padding ``k // 2`` so that outputs equal PyTorch's for the
same weights (``'SAME'`` would pad stride-2 convolutions asymmetrically).

Parameter names are part of the public contract (checkpoints and the torch
converter in :mod:`resnet_jax.models.convert` rely on them); see
``docs/parameter_names.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any

# Kaiming normal, fan_out, untruncated: torch.nn.init.kaiming_normal_(mode="fan_out",
# nonlinearity="relu") as torchvision and timm initialise every convolution.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@jax.custom_jvp
def _relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


@_relu.defjvp
def _relu_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (g,) = primals, tangents
    y = checkpoint_name(jnp.maximum(x, 0), "relu_output")
    return y, jnp.where(y > 0, g, jnp.zeros_like(g))


# ReLU whose derivative is taken from its output (kept anyway: the next convolution's
# input), as PyTorch's in-place ReLU; jax.nn.relu's derives it from the input.
relu_from_output = jax.checkpoint(_relu, policy=jax.checkpoint_policies.save_only_these_names("relu_output"))


def relu(x: Array) -> Array:
    """``max(x, 0)``; same values and derivatives as ``jax.nn.relu`` (gradient 0 at 0).

    Compiled for an NVIDIA GPU it is :data:`relu_from_output`: XLA:GPU then fuses the
    ReLU backward into BatchNorm's (ResNet-50 step at batch 256 on an H100: 2.8 GiB less
    HBM traffic, 0.43 GiB more memory). Elsewhere it is ``jax.nn.relu``: on a TPU the
    output-based derivative costs 1.6 GiB more memory and more traffic
    (docs/performance.md, change 2). The choice is made when the step is lowered for its
    platform (``jax.lax.platform_dependent``), so one model serves both.
    """
    return jax.lax.platform_dependent(x, cuda=relu_from_output, default=jax.nn.relu)


# The ReLUs (same values and derivatives): a max pool commutes with them (see Stem).
RELUS = (relu, relu_from_output, jax.nn.relu)

# A candidate, off until the device times it (docs/performance.md, change 13): in training, a
# projection shortcut (a stride-s one on every s-th pixel of its input; ResNet-D's and
# ResNet-RS's after the average pool) as one op, ``BatchNorm(..., input_conv1x1_kernel=...)``
# without an activation: on an NVIDIA GPU its convolution sums the BatchNorm's statistics as it
# stores its output, and its backward GEMMs compute the BatchNorm's gradient as they load the
# output's.
# The parameters are the same either way; benchmarks patch this to time it.
FUSE_SHORTCUT = False

# Part of changes 13 and 17 (docs/performance.md, change 23): where a block's projection shortcut
# takes every s-th pixel of the block's input itself (:func:`shortcut_subsamples`: those
# candidates), the residual branch and the shortcut read the input through
# :func:`subsample_fanout`, whose reverse pass adds the shortcut's gradient into the branch's at
# those pixels, in place, instead of padding it to the input's size and adding it everywhere. On
# whenever those candidates are; the values and gradients are the same either way.
SUBSAMPLE_GRAD_IN_PLACE = True

# A candidate, off until the device times it (docs/performance.md, change 22): in training, the
# classic stem's BatchNorm, max pool and ReLU as one op, ``BatchNorm(activation=max_pool_relu)``:
# on an NVIDIA GPU its reverse pass computes the pool's gradient inside the two Pallas kernels of
# the BatchNorm's backward (:func:`pallas_batch_norm.bn_pool_relu_train`) instead of writing it.
# The parameters are the same either way; benchmarks patch this to time it.
FUSE_STEM_POOL = False


class ShortcutProjection(NamedTuple):
    """A projection shortcut not yet computed (``Shortcut(..., deferred=True)``): its input (every
    s-th pixel of the block's input for a stride-s projection; ResNet-D's after the average
    pool), its (1, 1, C_in, C) kernel and its BatchNorm module. Given as ``residual`` to the
    BatchNorm that ends a Bottleneck, the block's last GEMM computes it beside its own
    (``blocks.FUSE_PROJECTION``, change 17); :meth:`apply` computes it on its own."""

    input: Array
    kernel: Array
    norm: nn.Module

    def apply(self, train: bool) -> Array:
        """The shortcut's output, ``BatchNorm(conv1x1(input, kernel))``, as ``Shortcut`` computes it."""
        return self.norm(self.input, train, input_conv1x1_kernel=self.kernel)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": relu,
    "swish": nn.swish,
    "silu": nn.swish,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation function called ``name`` (relu, swish/silu)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def conv(
    features: int,
    kernel_size: int = 3,
    strides: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    **options: Any,
) -> nn.Conv:
    """A 2-D convolution with PyTorch-style symmetric padding ``kernel_size // 2``.

    Bias-free by default (every ResNet conv is followed by BatchNorm; only the SE
    layers use a bias). ``groups`` is the feature-group count (ResNeXt). Kernels are
    HWIO, initialised Kaiming-normal fan_out. ``options``: other ``nn.Conv`` fields, e.g.
    ``precision`` or ``conv_general_dilated`` (another implementation of the same
    convolution, as ``benchmarks/stem_variants.py`` times). Call it inside a compact module.
    """
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        **options,
    )


class Conv1x1Kernel(nn.Module):
    """The kernel of a bias-free 1x1 convolution, for a BatchNorm that applies it itself
    (``BatchNorm(..., conv1x1_kernel=...)``). Declares the parameter :func:`conv` would: the
    same name (``kernel``), shape (1, 1, in, out), dtype and initialiser, so a checkpoint does
    not tell the two apart. Call it with the number of input channels."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> Array:
        return self.param("kernel", conv_kernel_init, (1, 1, in_features, self.features), self.param_dtype)


def conv_param_dtype(conv_factory: Callable[..., nn.Module]) -> Dtype:
    """The dtype a :func:`conv` factory (a ``functools.partial``) keeps its kernels in, for a
    kernel declared outside ``nn.Conv`` (:class:`Conv1x1Kernel`)."""
    return getattr(conv_factory, "keywords", {}).get("param_dtype", jnp.float32)


def conv1x1(x: Array, kernel: Array, dtype: Dtype) -> Array:
    """``x`` (N, H, W, C) through the bias-free 1x1 convolution ``kernel`` (1, 1, C, N) in
    ``dtype``, as flax's ``nn.Conv`` computes it."""
    return jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W with statistics in float32, optionally per group of examples.

    With ``group_size=None`` the statistics are taken over the whole batch. Under
    ``jit`` with the batch sharded across devices this is the *global* batch
    (synchronised BatchNorm): XLA inserts the cross-device reduction (on a GPU, one
    all-reduce of the Pallas kernels' per-device sums, :mod:`pallas_batch_norm`). With
    ``group_size=G`` the batch is split into ``N // G`` groups of ``G`` consecutive
    examples and each group is normalised with its own statistics ("ghost" BatchNorm,
    the paper's per-GPU BatchNorm); the running statistics then move towards the mean
    of the group means and the mean of the group (biased) variances.

    Running statistics are ``batch_stats/mean`` and ``batch_stats/var`` (the unbiased
    batch variance is *not* used, as in flax; PyTorch stores the unbiased one, which
    differs by a factor ``n / (n - 1)``). ``momentum`` follows flax's convention:
    ``running = momentum * running + (1 - momentum) * batch`` (PyTorch's 0.1 is 0.9
    here).

    Attributes:
      momentum: running-average decay (0.9 is PyTorch's 0.1).
      epsilon: added to the variance.
      zero_init_scale: initialise the scale (gamma) with zeros instead of ones; used
        on the last BatchNorm of each residual block so that blocks start as identity.
      group_size: examples per statistics group, or None for the whole batch.
      activation: applied to the output (e.g. the ReLU of ``conv -> BN -> ReLU``), or
        None. Same result as calling it on the output; knowing it lets the training
        computation treat BatchNorm and its activation as one function.
      dtype: output dtype; statistics and normalisation run in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_init_scale: bool = False
    group_size: int | None = None
    activation: Callable[[Array], Array] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, train: bool, *, statistics: tuple[Array, Array] | None = None,
        conv1x1_kernel: Array | None = None, input_conv1x1_kernel: Array | None = None,
        next_norm: BatchNorm | None = None, residual: Array | None = None,
        computed_by: tuple[int, Callable[..., tuple[Array, tuple[Array, Array]]]] | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array] | None]:
        """``activation(BatchNorm(x))``, x (N, H, W, C).

        ``statistics``: in training, the float32 (C,) whole-batch mean and biased variance of
        x, already computed (by the kernel that wrote x; see ``conv1x1_kernel``); they are
        used instead of reducing x again, and move the running statistics as usual.
        ``conv1x1_kernel``: the (1, 1, C, N) kernel of the bias-free 1x1 convolution that
        follows (:class:`Conv1x1Kernel`). The output is then that convolution's, z (N, H, W, N)
        in ``dtype``, returned with z's whole-batch mean and biased variance in training (for
        the next BatchNorm's ``statistics``; z is then returned as its float32 view, which that
        BatchNorm normalises) or None in evaluation. With whole-batch
        statistics and a ReLU, compiled for an NVIDIA GPU, the three run as one Pallas kernel
        (:func:`batch_norm_relu_conv1x1_train`); otherwise as the separate layers.
        ``input_conv1x1_kernel``: the (1, 1, C_in, C) kernel of the bias-free 1x1 convolution
        (:class:`Conv1x1Kernel`) whose output this BatchNorm normalises; x is then that
        convolution's input, (N, H, W, C_in). In training with whole-batch statistics the
        convolution returns them too (:func:`conv1x1_train_statistics`: on an NVIDIA GPU one
        Pallas kernel that sums them as it stores its output), and without an activation the
        convolution and the BatchNorm are one op (:func:`conv1x1_batch_norm_train`: on an
        NVIDIA GPU the BatchNorm's gradient is computed inside the convolution's backward
        GEMMs); otherwise it is :func:`conv1x1`, then the BatchNorm as usual.
        ``next_norm`` (with ``conv1x1_kernel``): the BatchNorm module that normalises z; the
        output is then that BatchNorm's, in ``dtype``. In training it is computed with this one
        as one function (:func:`batch_norm_relu_conv1x1_train`'s ``next_norm``: on an NVIDIA GPU
        its backward pass never stores z's gradient); in evaluation the layers run one after
        another. ``next_norm``'s parameters and running statistics are its own as usual.
        ``residual`` (with ``next_norm`` and an activation): (N, H, W, N) added to next_norm's
        output, then this BatchNorm's activation applied again: a Bottleneck's tail, returned
        as the block's output (on an NVIDIA GPU, :func:`batch_norm_relu_conv1x1_train`'s
        ``residual``: z is then never stored).
        ``computed_by``: how such a ``next_norm`` is called,
        ``(features, fn)``; x is then ignored (pass None) and ``fn(scale, bias, epsilon)``
        returns this BatchNorm's output and its float32 (C,) whole-batch mean and biased variance.
        """
        if residual is not None and (next_norm is None or conv1x1_kernel is None or self.activation is None):
            raise ValueError("BatchNorm: residual= is added after next_norm and followed by this BatchNorm's "
                             "activation; give it with conv1x1_kernel=, next_norm= and an activation")
        if isinstance(residual, ShortcutProjection) and not (
                train and (self.group_size or x.shape[0]) == x.shape[0]):
            residual = residual.apply(train)  # one op only with whole-batch statistics in training
        if computed_by is not None:
            if not train:
                raise ValueError("BatchNorm: computed_by is a training-mode computation; call it with train=True")
            features, compute = computed_by
            scale, bias, ra_mean, ra_var = self._parameters(features)
            y, (mean, var) = compute(scale, bias, self.epsilon)
            self._update_running_statistics(ra_mean, ra_var, mean[None], var[None])
            return y
        if input_conv1x1_kernel is not None:
            if statistics is not None or conv1x1_kernel is not None:
                raise ValueError("BatchNorm: input_conv1x1_kernel takes its statistics from the convolution "
                                 "and cannot be combined with statistics= or conv1x1_kernel=")
            if train and (self.group_size or x.shape[0]) == x.shape[0]:
                if self.activation is None:
                    scale, bias, ra_mean, ra_var = self._parameters(input_conv1x1_kernel.shape[-1])
                    y, mean, var = conv1x1_batch_norm_train(x, input_conv1x1_kernel, scale, bias, self.epsilon,
                                                            self.dtype)
                    self._update_running_statistics(ra_mean, ra_var, mean[None], var[None])
                    return y
                x, statistics = conv1x1_train_statistics(x, input_conv1x1_kernel, self.dtype)
            else:
                x = conv1x1(x, input_conv1x1_kernel, self.dtype)
        scale, bias, ra_mean, ra_var = self._parameters(x.shape[-1])

        if train:
            batch = x.shape[0]
            group = self.group_size or batch
            if batch % group:
                raise ValueError(
                    f"BatchNorm group_size={group} does not divide the batch of {batch}; "
                    "choose a bn_group_size that divides the per-step batch"
                )
            if statistics is not None and group != batch:
                raise ValueError("BatchNorm statistics given from outside are whole-batch ones; "
                                 f"this BatchNorm has group_size={group}: leave statistics=None")
            out_statistics = None
            if conv1x1_kernel is not None and next_norm is not None:
                own = []

                def with_next(next_scale: Array, next_bias: Array, next_epsilon: float) -> tuple:
                    if not isinstance(residual, ShortcutProjection):
                        u, mean, var, next_statistics = batch_norm_relu_conv1x1_train(
                            x, scale, bias, conv1x1_kernel, group, self.epsilon, self.dtype, self.activation,
                            next_norm=(next_scale, next_bias, next_epsilon), residual=residual)
                        own.append((mean, var))
                        return u, next_statistics
                    nexts = []

                    def with_shortcut_norm(shortcut_scale: Array, shortcut_bias: Array, shortcut_epsilon: float):
                        u, mean, var, next_statistics, shortcut_statistics = batch_norm_relu_conv1x1_train(
                            x, scale, bias, conv1x1_kernel, group, self.epsilon, self.dtype, self.activation,
                            next_norm=(next_scale, next_bias, next_epsilon),
                            projection=(residual.input, residual.kernel, shortcut_scale, shortcut_bias,
                                        shortcut_epsilon))
                        own.append((mean, var))
                        nexts.append(next_statistics)
                        return u, shortcut_statistics

                    u = residual.norm(None, train, computed_by=(conv1x1_kernel.shape[-1], with_shortcut_norm))
                    return u, nexts[0]

                y = next_norm(None, train, computed_by=(conv1x1_kernel.shape[-1], with_next))
                (mean, var), conv1x1_kernel = own[0], None  # the output is next_norm's: no statistics out
            elif conv1x1_kernel is not None:
                y, mean, var, out_statistics = batch_norm_relu_conv1x1_train(
                    x, scale, bias, conv1x1_kernel, group, self.epsilon, self.dtype, self.activation)
            elif statistics is not None:
                mean, var = statistics[0][None], statistics[1][None]
                y = batch_norm_apply(x, statistics[0], statistics[1], scale, bias, self.epsilon, self.dtype,
                                     self.activation)
            else:
                y, mean, var = _batch_norm_train(
                    x, scale, bias, group, self.epsilon, self.dtype, self.activation
                )
            self._update_running_statistics(ra_mean, ra_var, mean, var)
            return y if conv1x1_kernel is None else (y, out_statistics)
        inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - ra_mean.value) * inv + bias.astype(jnp.float32)
        y = y.astype(self.dtype)
        y = y if self.activation is None else self.activation(y)
        if conv1x1_kernel is not None and next_norm is not None:  # the layers one after another
            u = next_norm(conv1x1(y, conv1x1_kernel, self.dtype), train)
            return u if residual is None else self.activation(u + residual.astype(u.dtype))
        return y if conv1x1_kernel is None else (conv1x1(y, conv1x1_kernel, self.dtype), None)

    def _parameters(self, features: int) -> tuple[Array, Array, Any, Any]:
        """scale, bias (``param_dtype``, (features,)) and the running mean and variance variables."""
        scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
        scale = self.param("scale", scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        return scale, bias, ra_mean, ra_var

    def _update_running_statistics(self, ra_mean: Any, ra_var: Any, mean: Array, var: Array) -> None:
        """Moves the running statistics towards the mean of the (groups, C) batch ``mean`` and ``var``."""
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0)
            ra_var.value = m * ra_var.value + (1 - m) * var.mean(0)


def _batch_norm_train(
    x: Array,
    scale: Array,
    bias: Array,
    group: int,
    epsilon: float,
    dtype: Dtype,
    activation: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array, Array]:
    """Normalises ``x`` (N, ..., C) with the statistics of each group of ``group`` examples.

    Returns the output in ``dtype`` (passed through ``activation`` if given) and the float32
    (N // group, C) means and biased variances. With whole-batch statistics (``group == N``),
    compiled for an NVIDIA GPU, the reductions run in Pallas kernels
    (:mod:`resnet_jax.models.pallas_batch_norm`: the ResNet-50 step 4.4% faster on an H100);
    elsewhere, and for ghost BatchNorm, it is :func:`batch_norm_train_xla`. The choice is
    made when the step is lowered for its platform (``jax.lax.platform_dependent``).
    """
    if group != x.shape[0]:
        return batch_norm_train_xla(x, scale, bias, group, epsilon, dtype, activation)

    def on_gpu(x: Array, scale: Array, bias: Array) -> tuple[Array, Array, Array]:
        from resnet_jax.models import pallas_batch_norm

        return pallas_batch_norm.batch_norm_train(x, scale, bias, epsilon, dtype, activation)

    def elsewhere(x: Array, scale: Array, bias: Array) -> tuple[Array, Array, Array]:
        return batch_norm_train_xla(x, scale, bias, group, epsilon, dtype, activation)

    return jax.lax.platform_dependent(x, scale, bias, cuda=on_gpu, default=elsewhere)


def batch_norm_train_xla(
    x: Array,
    scale: Array,
    bias: Array,
    group: int,
    epsilon: float,
    dtype: Dtype,
    activation: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array, Array]:
    """:func:`_batch_norm_train` as plain autodiff of the formula, for every platform.

    XLA:GPU fuses the float32 ``x - mean`` and ``x_hat`` into the kernels that use them and
    keeps only the compute-dtype input for the backward pass (docs/performance.md, changes 1
    and 2: a ``jax.checkpoint`` here cost 13% more HBM traffic on the H100).
    """
    features = x.shape[-1]
    grouped = x.astype(jnp.float32).reshape((x.shape[0] // group, group) + x.shape[1:])
    reduce_axes = tuple(range(1, grouped.ndim - 1))
    # One pass over the data: E[x] and E[x^2] together (as flax's fast variance).
    mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
    mean_sq = jnp.mean(jnp.square(grouped), axis=reduce_axes, keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    y = ((grouped - mean) * inv + bias.astype(jnp.float32)).reshape(x.shape).astype(dtype)
    if activation is not None:
        y = activation(y)
    return y, mean.reshape(-1, features), var.reshape(-1, features)


def batch_norm_apply(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype,
                     activation: Callable[[Array], Array] | None = None) -> Array:
    """``activation((x - mean) * rsqrt(var + epsilon) * scale + bias)`` in ``dtype`` with given
    float32 (C,) statistics, x (N, ..., C): the training-mode apply of :func:`_batch_norm_train`
    without its reductions. With a ReLU, compiled for an NVIDIA GPU, it is
    ``pallas_batch_norm.bn_relu_apply`` (the backward pass's reductions in a Pallas kernel, as
    for the model's other inner BatchNorms); otherwise the plain formula."""

    def plain(x: Array, mean: Array, var: Array, scale: Array, bias: Array) -> Array:
        inv = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
        y = ((x.astype(jnp.float32) - mean) * inv + bias.astype(jnp.float32)).astype(dtype)
        return y if activation is None else activation(y)

    if activation not in RELUS:
        return plain(x, mean, var, scale, bias)

    def on_gpu(x: Array, mean: Array, var: Array, scale: Array, bias: Array) -> Array:
        from resnet_jax.models import pallas_batch_norm

        return pallas_batch_norm.bn_relu_apply(x, mean, var, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                               epsilon, dtype)

    return jax.lax.platform_dependent(x, mean, var, scale, bias, cuda=on_gpu, default=plain)


def conv1x1_train_statistics(x: Array, kernel: Array, dtype: Dtype) -> tuple[Array, tuple[Array, Array]]:
    """``z = conv1x1(x, kernel)`` in ``dtype``, x (N, H, W, C_in), kernel (1, 1, C_in, C), and z's
    float32 (C,) whole-batch mean and biased variance, for the BatchNorm that follows
    (``BatchNorm(..., input_conv1x1_kernel=...)``). Compiled for an NVIDIA GPU this is
    :func:`pallas_conv1x1_statistics`: one kernel stores z and sums its statistics, so z is not
    read back for them. Elsewhere, the convolution and then the reductions
    (:func:`conv1x1_statistics_layers`)."""
    return jax.lax.platform_dependent(
        x, kernel, cuda=functools.partial(pallas_conv1x1_statistics, dtype=dtype),
        default=functools.partial(conv1x1_statistics_layers, dtype=dtype))


def conv1x1_batch_norm_train(x: Array, kernel: Array, scale: Array, bias: Array, epsilon: float,
                             dtype: Dtype) -> tuple[Array, Array, Array]:
    """``BatchNorm(conv1x1(x, kernel))`` in training, whole-batch statistics, no activation: x
    (N, H, W, C_in), kernel (1, 1, C_in, C). Returns the output in ``dtype`` and the float32
    (C,) batch mean and biased variance of the convolution's output. Compiled for an NVIDIA GPU
    this is ``pallas_fused_conv.conv1x1_bn`` (one op: the statistics summed as the convolution
    stores its output, the BatchNorm's gradient computed in its backward GEMMs; change 13).
    Elsewhere, :func:`conv1x1_statistics_layers` and then :func:`batch_norm_apply`."""

    def one_by_one(x: Array, kernel: Array, scale: Array, bias: Array) -> tuple[Array, Array, Array]:
        z, (mean, var) = conv1x1_statistics_layers(x, kernel, dtype=dtype)
        return batch_norm_apply(z, mean, var, scale, bias, epsilon, dtype), mean, var

    return jax.lax.platform_dependent(
        x, kernel, scale, bias, cuda=functools.partial(pallas_conv1x1_batch_norm, epsilon=epsilon, dtype=dtype),
        default=one_by_one)


def pallas_conv1x1_batch_norm(x: Array, kernel: Array, scale: Array, bias: Array, *, epsilon: float, dtype: Dtype,
                              interpret: bool = False) -> tuple[Array, Array, Array]:
    """:func:`conv1x1_batch_norm_train` for a GPU (or, ``interpret``, under the Pallas
    interpreter): ``pallas_fused_conv.conv1x1_bn``."""
    from resnet_jax.models import pallas_fused_conv

    return pallas_fused_conv.conv1x1_bn(x, kernel, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon,
                                        dtype, interpret)


def conv1x1_statistics_layers(x: Array, kernel: Array, *, dtype: Dtype) -> tuple[Array, tuple[Array, Array]]:
    """:func:`conv1x1_train_statistics` as the separate layers: :func:`conv1x1`, then the
    one-pass E[z], E[z^2] of :func:`batch_norm_train_xla`."""
    z = conv1x1(x, kernel, dtype)
    rows = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    mean = jnp.mean(rows, axis=0)
    return z, (mean, jnp.maximum(jnp.mean(jnp.square(rows), axis=0) - jnp.square(mean), 0.0))


def pallas_conv1x1_statistics(x: Array, kernel: Array, *, dtype: Dtype,
                              interpret: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """:func:`conv1x1_train_statistics` for a GPU (or, ``interpret``, under the Pallas
    interpreter): ``pallas_fused_conv.conv1x1_moments``."""
    from resnet_jax.models import pallas_fused_conv

    z, (mean, mean_sq) = pallas_fused_conv.conv1x1_moments(x, kernel, dtype, interpret)
    return z, (mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0))


def batch_norm_relu_conv1x1_train(
    x: Array,
    scale: Array,
    bias: Array,
    kernel: Array,
    group: int,
    epsilon: float,
    dtype: Dtype,
    activation: Callable[[Array], Array] | None = None,
    next_norm: tuple[Array, Array, float] | None = None,
    residual: Array | None = None,
    projection: tuple[Array, Array, Array, Array, float] | None = None,
) -> tuple:
    """``z = conv1x1(activation(BatchNorm(x)), kernel)`` in training, x (N, H, W, C), kernel
    (1, 1, C, N). Returns z (computed and stored in ``dtype``, returned as its float32 view, so
    that the next BatchNorm's normalisation and these statistics share it and z's gradient is
    summed in float32), the BatchNorm's float32 (N // group, C) means and biased variances (as
    :func:`_batch_norm_train`), and z's float32 whole-batch mean and biased variance, each (N,).
    ``next_norm``: ``(scale, bias, epsilon)`` of the BatchNorm that normalises z with those
    statistics; the first result is then its output, in ``dtype``, instead of z. ``residual``
    (with ``next_norm``), (N, H, W, N): the first result is then ``activation(output +
    residual)`` (a Bottleneck's output; on an NVIDIA GPU one op that never stores z,
    ``pallas_fused_conv.bn_relu_conv1x1_bn_add_relu``). ``projection`` (with ``next_norm`` and an
    activation, instead of ``residual``): ``(input, kernel, scale, bias, epsilon)`` of a projection
    shortcut, a 1x1 convolution (input (N, H, W, C_in), kernel (1, 1, C_in, N)) and a whole-batch
    BatchNorm, whose output is the residual; the shortcut's float32 (N,) mean and biased
    variance are then returned last (on an NVIDIA GPU one op that stores neither convolution's
    output, ``pallas_fused_conv.bn_relu_conv1x1_bn_add_conv1x1_bn_relu``).

    With whole-batch statistics and a ReLU, compiled for an NVIDIA GPU, this is
    :func:`pallas_fused_conv_train`: one kernel applies the BatchNorm and ReLU to x as it loads
    it, multiplies, and sums z's statistics as it stores z (with ``next_norm``, the backward
    kernels also compute z's gradient from the next BatchNorm's as they load it). Otherwise,
    and on other platforms, the layers run one after another (:func:`batch_norm_conv1x1_layers`).
    """
    next_arrays, next_epsilon, shortcut_epsilon = conv1x1_tail_arguments(next_norm, residual, projection, activation)
    one_by_one = functools.partial(batch_norm_conv1x1_layers, group=group, epsilon=epsilon, dtype=dtype,
                                   activation=activation, next_epsilon=next_epsilon, shortcut_epsilon=shortcut_epsilon)
    if group != x.shape[0] or activation not in RELUS:
        return one_by_one(x, scale, bias, kernel, *next_arrays)
    fused = functools.partial(pallas_fused_conv_train, epsilon=epsilon, dtype=dtype, next_epsilon=next_epsilon,
                              shortcut_epsilon=shortcut_epsilon)
    return jax.lax.platform_dependent(x, scale, bias, kernel, *next_arrays, cuda=fused, default=one_by_one)


def conv1x1_tail_arguments(next_norm: tuple[Array, Array, float] | None, residual: Array | None,
                           projection: tuple[Array, Array, Array, Array, float] | None,
                           activation: Callable[[Array], Array] | None) -> tuple[tuple, float | None, float | None]:
    """:func:`batch_norm_relu_conv1x1_train`'s ``next_norm``, ``residual`` and ``projection`` as
    :func:`batch_norm_conv1x1_layers`' and :func:`pallas_fused_conv_train`'s positional arrays
    after the kernel, and their ``next_epsilon`` and ``shortcut_epsilon``; refuses the
    combinations that cannot work."""
    next_arrays, next_epsilon = ((), None) if next_norm is None else (next_norm[:2], next_norm[2])
    if residual is None and projection is None:
        return next_arrays, next_epsilon, None
    if next_norm is None or activation is None or (residual is not None and projection is not None):
        raise ValueError("batch_norm_relu_conv1x1_train: residual or projection (not both) needs next_norm "
                         "and an activation")
    if residual is not None:
        return (*next_arrays, residual), next_epsilon, None
    return (*next_arrays, None, *projection[:4]), next_epsilon, projection[4]


def batch_norm_conv1x1_layers(x: Array, scale: Array, bias: Array, kernel: Array, next_scale: Array | None = None,
                              next_bias: Array | None = None, residual: Array | None = None,
                              shortcut_input: Array | None = None, shortcut_kernel: Array | None = None,
                              shortcut_scale: Array | None = None, shortcut_bias: Array | None = None, *,
                              group: int, epsilon: float, dtype: Dtype,
                              activation: Callable[[Array], Array] | None = None, next_epsilon: float | None = None,
                              shortcut_epsilon: float | None = None) -> tuple:
    """:func:`batch_norm_relu_conv1x1_train` as the separate layers: :func:`_batch_norm_train`,
    :func:`conv1x1`, then z's statistics as plain reductions (and the next BatchNorm's apply,
    :func:`batch_norm_apply`, where ``next_scale`` is given; then ``activation(... + residual)``
    where ``residual`` is, or where ``shortcut_input`` is, the shortcut's convolution and its
    whole-batch BatchNorm as the residual, its statistics returned last)."""
    shortcut_statistics = None
    if shortcut_input is not None:
        zs = conv1x1(shortcut_input, shortcut_kernel, dtype)
        residual, shortcut_mean, shortcut_var = _batch_norm_train(zs, shortcut_scale, shortcut_bias, zs.shape[0],
                                                                  shortcut_epsilon, dtype, None)
        shortcut_statistics = (shortcut_mean[0], shortcut_var[0])
    y, mean, var = _batch_norm_train(x, scale, bias, group, epsilon, dtype, activation)
    z = conv1x1(y, kernel, dtype).astype(jnp.float32)
    rows = z.reshape(-1, z.shape[-1])
    z_mean = jnp.mean(rows, axis=0)
    z_var = jnp.maximum(jnp.mean(jnp.square(rows), axis=0) - jnp.square(z_mean), 0.0)
    if next_scale is not None:
        z = batch_norm_apply(z, z_mean, z_var, next_scale, next_bias, next_epsilon, dtype)
    if residual is not None:
        z = activation(z + residual.astype(z.dtype))
    if shortcut_statistics is not None:
        return z, mean, var, (z_mean, z_var), shortcut_statistics
    return z, mean, var, (z_mean, z_var)


def pallas_fused_conv_train(x: Array, scale: Array, bias: Array, kernel: Array, next_scale: Array | None = None,
                            next_bias: Array | None = None, residual: Array | None = None,
                            shortcut_input: Array | None = None, shortcut_kernel: Array | None = None,
                            shortcut_scale: Array | None = None, shortcut_bias: Array | None = None, *,
                            epsilon: float, dtype: Dtype, next_epsilon: float | None = None,
                            shortcut_epsilon: float | None = None, interpret: bool = False) -> tuple:
    """:func:`batch_norm_relu_conv1x1_train` for a GPU (or, ``interpret``, under the Pallas
    interpreter): x's statistics from ``pallas_batch_norm.batch_moments``, then
    ``pallas_fused_conv.bn_relu_conv1x1`` (``bn_relu_conv1x1_bn`` where ``next_scale`` is given,
    ``bn_relu_conv1x1_bn_add_relu`` where ``residual`` is too,
    ``bn_relu_conv1x1_bn_add_conv1x1_bn_relu`` where ``shortcut_input`` is)."""
    from resnet_jax.models import pallas_batch_norm, pallas_fused_conv

    c = x.shape[-1]
    mean, mean_sq = pallas_batch_norm.batch_moments(x.astype(jnp.float32).reshape(-1, c), x.dtype, interpret)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if shortcut_input is not None:
        out, z_mean, z_var, shortcut_mean, shortcut_var = pallas_fused_conv.bn_relu_conv1x1_bn_add_conv1x1_bn_relu(
            x, mean, var, scale, bias, kernel, next_scale.astype(jnp.float32), next_bias.astype(jnp.float32),
            shortcut_input.astype(dtype), shortcut_kernel, shortcut_scale.astype(jnp.float32),
            shortcut_bias.astype(jnp.float32), epsilon, next_epsilon, shortcut_epsilon, dtype, interpret)
        return out, mean[None], var[None], (z_mean, z_var), (shortcut_mean, shortcut_var)
    if residual is not None:
        out, z_mean, z_var = pallas_fused_conv.bn_relu_conv1x1_bn_add_relu(
            x, mean, var, scale, bias, kernel, next_scale.astype(jnp.float32), next_bias.astype(jnp.float32),
            residual.astype(dtype), epsilon, next_epsilon, dtype, interpret)
        return out, mean[None], var[None], (z_mean, z_var)
    if next_scale is not None:
        u, z_mean, z_var = pallas_fused_conv.bn_relu_conv1x1_bn(
            x, mean, var, scale, bias, kernel, next_scale.astype(jnp.float32), next_bias.astype(jnp.float32),
            epsilon, next_epsilon, dtype, interpret)
        return u, mean[None], var[None], (z_mean, z_var)
    z, (z_mean, z_mean_sq) = pallas_fused_conv.bn_relu_conv1x1(x, mean, var, scale, bias, kernel, epsilon, dtype,
                                                               interpret)
    return z, mean[None], var[None], (z_mean, jnp.maximum(z_mean_sq - jnp.square(z_mean), 0.0))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as timm's ``SEModule``.

    Global average pool -> 1x1 conv (``fc1``, with bias) -> ReLU -> 1x1 conv
    (``fc2``, with bias) -> sigmoid gate on the input channels. The reduced width is
    ``make_divisible(channels * ratio, 8)`` as in timm.
    """

    ratio: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        reduced = make_divisible(channels * self.ratio, 8)
        make = functools.partial(
            conv, kernel_size=1, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype
        )
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = relu(make(reduced, name="fc1")(s))
        s = make(channels, name="fc2")(s)
        return x * nn.sigmoid(s).astype(x.dtype)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), as timm."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def avg_pool_ceil(x: Array, stride: int) -> Array:
    """2x2 average pool, ``ceil_mode=True, count_include_pad=False`` as timm's ResNet-D shortcut."""
    if stride == 1:
        return x
    pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)


def max_pool_3x3_s2(x: Array) -> Array:
    """3x3 max pool, stride 2, padding 1 (PyTorch's ``MaxPool2d(3, 2, 1)``) of NHWC ``x``.

    Compiled for an NVIDIA GPU it is :func:`max_pool_parity`, elsewhere flax's
    ``nn.max_pool``: same values and derivatives, chosen when the step is lowered.
    """
    return jax.lax.platform_dependent(x, cuda=max_pool_parity, default=_max_pool)


def _max_pool(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def max_pool_relu(x: Array) -> Array:
    """``relu(max_pool_3x3_s2(x))``: the classic stem's pool and ReLU, as the activation of its
    BatchNorm (``BatchNorm(activation=max_pool_relu)``), which then treats the three as one
    function in training (:func:`pallas_batch_norm.batch_norm_train`)."""
    return jax.nn.relu(max_pool_3x3_s2(x))


# Window tap d (0, 1, 2) of output o reads input 2o - 1 + d: block o - 1 parity 1, block o
# parity 0, block o parity 1. (shift in blocks, parity) per tap:
_TAPS = ((1, 1), (0, 0), (0, 1))


def _window_taps(x: Array, fill: float) -> list[Array]:
    """The nine taps of the 3x3/2 windows (padding 1) of NHWC ``x``, row-major, each (N, Ho, Wo, C).

    ``x`` is padded with ``fill`` to even H and W and viewed as (N, Ho, 2, Wo, 2, C) parity
    planes (a reshape, no copy): each tap is then a parity plane shifted by 0 or 1 block,
    with ``fill`` shifted in, where a strided slice would need index arithmetic per element.
    """
    n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    fill_value = jnp.array(fill, x.dtype)
    x = jax.lax.pad(x, fill_value, ((0, 0, 0), (0, h % 2, 0), (0, w % 2, 0), (0, 0, 0)))
    planes = x.reshape(n, ho, 2, wo, 2, c)
    taps = []
    for row_shift, row_parity in _TAPS:
        for col_shift, col_parity in _TAPS:
            # each tap from the planes directly, not through a shared row slice: the backward
            # pass then adds the windows' contributions to an input element in the order of
            # XLA's select-and-scatter (window by window), so the gradients are equal bit for bit
            tap = planes[:, :, row_parity, :, col_parity]  # (N, Ho, Wo, C)
            if row_shift or col_shift:
                tap = jax.lax.pad(tap, fill_value, ((0, 0, 0), (row_shift, -row_shift, 0),
                                                    (col_shift, -col_shift, 0), (0, 0, 0)))
            taps.append(tap)
    return taps


@jax.custom_jvp
def max_pool_parity(x: Array) -> Array:
    """3x3/2 max pool, padding 1, of NHWC ``x``: ``nn.max_pool``'s values and derivative.

    The derivative goes to the first maximum of each window in row-major order, exactly as
    ``nn.max_pool``'s (XLA's select-and-scatter), in forward and reverse mode. The windows
    are read as shifted 2x2 parity planes of the input (:func:`_window_taps`), so each tap
    is a stride-1 slice and the backward pass adds at most four taps per input element.
    XLA:GPU lowers ``nn.max_pool``'s gradient to a scatter fed by int32 index tensors (4.6
    GiB of HBM traffic per ResNet-50 step at batch 256 on an H100); this is two loop
    fusions. On the H100 the stem's BatchNorm + pool + ReLU, forward and backward, took
    1.55 ms this way, 2.08 with nine strided slices (the previous version) and 3.02 with
    ``nn.max_pool`` (docs/performance.md). On a TPU the built-in is better (change 3).
    """
    return functools.reduce(jnp.maximum, _window_taps(x, -jnp.inf))


def pool_with_first_max(x: Array) -> tuple[Array, Array]:
    """The 3x3/2 max pool of ``x`` and, per output, the int8 row-major index (0-8) of the first
    window tap that equals the maximum: where ``nn.max_pool``'s derivative goes."""
    taps = _window_taps(x, -jnp.inf)
    y = functools.reduce(jnp.maximum, taps)
    first_max = jnp.full(y.shape, 9, jnp.int8)
    for k in reversed(range(9)):  # the lowest k that equals the maximum wins
        first_max = jnp.where(taps[k] == y, jnp.int8(k), first_max)
    return y, first_max


def pool_tangent(first_max: Array, t: Array) -> Array:
    """The pool's tangent: each output's first maximal tap of the input tangent ``t`` (0 where
    ``first_max`` is 9, no tap: how the fused stem marks the outputs its ReLU zeroes)."""
    t_out = jnp.zeros(first_max.shape, t.dtype)
    for k, tap in enumerate(_window_taps(t, 0.0)):
        t_out = t_out + jnp.where(first_max == k, tap, jnp.zeros_like(tap))
    return t_out


@max_pool_parity.defjvp
def _max_pool_parity_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y, first_max = pool_with_first_max(x)
    return y, pool_tangent(first_max, t)


def _pool_cotangent_by_plane(first_max: Array, ct: Array, height: int, width: int) -> Array:
    """The transpose of :func:`pool_tangent`: the input's (N, height, width, C) cotangent from
    the output's ``ct``, built one 2x2 parity plane at a time. An input element of parity 0 in
    a dimension is tap 1 of one window; one of parity 1 is tap 2 of window o and tap 0 of
    window o + 1. So plane (0, 0) takes one term, (0, 1) and (1, 0) two, (1, 1) four, 9 in
    all, where the transpose XLA derives adds nine padded terms at every input element. The
    terms are added in window order (row-major), as XLA's select-and-scatter does."""
    def chosen(k: int, row_shift: int, col_shift: int) -> Array:
        # window (o + row_shift, p + col_shift)'s ct where its first maximum is tap k, else 0
        term = jnp.where(first_max == k, ct, jnp.zeros_like(ct))
        if row_shift or col_shift:
            term = jax.lax.pad(term, jnp.zeros((), ct.dtype), ((0, 0, 0), (-row_shift, row_shift, 0),
                                                              (-col_shift, col_shift, 0), (0, 0, 0)))
        return term

    taps_by_parity = (((1, 0),), ((2, 0), (0, 1)))  # (tap, window shift) covering parity 0 / 1
    rows = []
    for row_parity in (0, 1):
        plane_row = []
        for col_parity in (0, 1):
            terms = [chosen(3 * row_tap + col_tap, row_shift, col_shift)
                     for row_tap, row_shift in taps_by_parity[row_parity]
                     for col_tap, col_shift in taps_by_parity[col_parity]]
            plane_row.append(functools.reduce(jnp.add, terms))
        rows.append(jnp.stack(plane_row, axis=3))  # (N, Ho, Wo, 2, C)
    n, ho, wo, c = ct.shape
    planes = jnp.stack(rows, axis=2)  # (N, Ho, 2, Wo, 2, C)
    return planes.reshape(n, 2 * ho, 2 * wo, c)[:, :height, :width]


@jax.custom_jvp
def max_pool_planes(x: Array) -> Array:
    """:func:`max_pool_parity` with a hand-written reverse pass (:func:`_pool_cotangent_by_plane`):
    the same values and derivatives as ``nn.max_pool``, bit for bit, in forward and reverse
    mode (second derivatives too, to rounding). A candidate timed by
    ``benchmarks/stem_variants.py``: in the ResNet-50 step on an H100 the backward loop
    fusion XLA derives for :func:`max_pool_parity` took 1.31 ms at 430 GB/s; compiled for
    the H100, this one's is a single concatenate fusion (docs/performance.md, change 7)."""
    return functools.reduce(jnp.maximum, _window_taps(x, -jnp.inf))


@max_pool_planes.defjvp
def _max_pool_planes_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y, first_max = pool_with_first_max(x)
    transpose = functools.partial(_pool_cotangent_by_plane, height=x.shape[1], width=x.shape[2])
    return y, jax.custom_derivatives.linear_call(pool_tangent, transpose, first_max, t)


def conv_7x7_s2_direct(x: Array, kernel: Array) -> Array:
    """The stem's 7x7/2 convolution, padding 3: NHWC ``x``, HWIO ``kernel`` (cuDNN's, XLA's)."""
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_7x7_s2_space_to_depth(x: Array, kernel: Array, channels: int | None = 16) -> Array:
    """:func:`conv_7x7_s2_direct` as a 4x4 stride-1 convolution over 2x2 pixel blocks folded
    into the channels (space to depth, the stem of MLPerf's TPU ResNet-50): the same sums.

    With ``xp`` the input padded by 3 in front, output ``o`` is ``sum_k xp[2o + k] w[k]`` for
    k = 0..6 per spatial axis. Writing k = 2q + p (p = 0, 1; w[7] = 0) and ``X[b, p] =
    xp[2b + p]`` gives ``sum_q X[o + q] . W[q]``: a valid 4-tap convolution over blocks with
    2 x 2 x C channels. ``channels`` zero-pads those (12 for RGB) further, to 16 by default:
    on an H100 the stem convolution, forward and weight gradient, took 1.22 ms this way
    against 3.02 direct (1.60 at 12 channels), and the ResNet-50 step ran 4.2% faster.
    """
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    if (kh, kw) != (7, 7):
        raise ValueError(f"conv_7x7_s2_space_to_depth is the 7x7/2 stem's convolution, got a {kh}x{kw} kernel")
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # as conv_7x7_s2_direct: (h + 6 - 7) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (3, 2 * (ho + 3) - h - 3), (3, 2 * (wo + 3) - w - 3), (0, 0)))
    blocks = xp.reshape(n, ho + 3, 2, wo + 3, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, ho + 3, wo + 3, 4 * c)
    kp = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    k_blocks = kp.reshape(4, 2, 4, 2, c, features).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, features)
    if channels is not None and channels > 4 * c:
        blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, 0), (0, channels - 4 * c)))
        k_blocks = jnp.pad(k_blocks, ((0, 0), (0, 0), (0, channels - 4 * c), (0, 0)))
    return jax.lax.conv_general_dilated(blocks, k_blocks, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_7x7_s2(x: Array, kernel: Array) -> Array:
    """The classic stem's 7x7/2 convolution (padding 3): :func:`conv_7x7_s2_space_to_depth`
    compiled for an NVIDIA GPU, :func:`conv_7x7_s2_direct` elsewhere (chosen when lowered)."""
    return jax.lax.platform_dependent(x, kernel, cuda=conv_7x7_s2_space_to_depth, default=conv_7x7_s2_direct)


def as_lax_conv(impl: Callable[[Array, Array], Array]) -> Callable[..., Array]:
    """``impl`` (x, kernel) -> y, a 7x7/2 convolution with padding 3, with
    ``lax.conv_general_dilated``'s signature, as ``nn.Conv(conv_general_dilated=...)`` calls
    it. A call that is not that convolution, or that asks for an option ``impl`` does not
    take (dilation, groups, ``precision``), goes to ``lax.conv_general_dilated`` unchanged."""

    def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                             lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                             dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                             **options: Any) -> Array:
        stem = (tuple(window_strides) == (2, 2) and not isinstance(padding, str)
                and [tuple(p) for p in padding] == [(3, 3), (3, 3)]
                and rhs.shape[:2] == (7, 7) and lhs.ndim == 4 and feature_group_count == 1
                and precision is None and not options
                and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation)))
        if stem:
            return impl(lhs, rhs)
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **options)

    return conv_general_dilated


class Stem(nn.Module):
    """The network's input layers, from the image to the first stage.

    ``kind``:
      * ``classic``: 7x7/2 conv (``conv1``) + BN (``bn1``) + act (He et al. 2015). On an
        NVIDIA GPU the convolution is computed as space to depth (:func:`conv_7x7_s2`); its
        parameter is the same (7, 7, C, width) kernel.
      * ``deep``: three 3x3 convs, the first stride 2, widths ``(stem_width,
        stem_width, 2 * stem_width)`` (ResNet-C/D/RS; names ``conv1_0``, ``bn1_0``,
        ``conv1_1``, ``bn1_1``, ``conv1_2``, then ``bn1``).
      * ``cifar``: one 3x3/1 conv + BN + act, no pooling (the paper's CIFAR nets).
    ``pool``: ``max`` (3x3/2 max pool), ``conv`` (a 3x3/2 conv ``pool_conv`` + BN
    ``pool_bn`` + act, ResNet-RS) or ``none``.

    With a ReLU and the max pool, the ReLU is applied after the pool: ReLU is monotonic, so
    ``relu(max_pool(y)) == max_pool(relu(y))`` exactly, and the derivative goes to the same
    input element (the first maximum of its window; where a window's maximum is <= 0 both
    give 0). The BatchNorm output then feeds the pool directly and is never written at full
    resolution: ResNet-50 at batch 256 on an H100 moves 1.24 GiB less per step and keeps
    0.38 GiB less (docs/performance.md, change 4).
    """

    kind: str
    width: int
    pool: str
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[Array], Array]

    @property
    def out_features(self) -> int:
        return 2 * self.width if self.kind == "deep" else self.width

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.kind == "classic":
            x = self.conv(self.width, kernel_size=7, strides=2, name="conv1",
                          conv_general_dilated=as_lax_conv(lambda x, kernel: conv_7x7_s2(x, kernel)))(x)
        elif self.kind == "deep":
            widths = (self.width, self.width, 2 * self.width)
            for i, w in enumerate(widths):
                x = self.conv(w, kernel_size=3, strides=2 if i == 0 else 1, name=f"conv1_{i}")(x)
                if i < 2:
                    x = self.norm(name=f"bn1_{i}", activation=self.act)(x, train)
        elif self.kind == "cifar":
            x = self.conv(self.width, kernel_size=3, strides=1, name="conv1")(x)
        else:
            raise ValueError(f"unknown stem {self.kind!r}; choose classic, deep or cifar")
        if self.pool == "max" and self.act in RELUS and FUSE_STEM_POOL:
            return self.norm(name="bn1", activation=max_pool_relu)(x, train)
        x = self.norm(name="bn1")(x, train)
        if self.pool == "max" and self.act in RELUS:
            return self.act(max_pool_3x3_s2(x))
        x = self.act(x)
        if self.pool == "max":
            x = max_pool_3x3_s2(x)
        elif self.pool == "conv":
            x = self.conv(x.shape[-1], kernel_size=3, strides=2, name="pool_conv")(x)
            x = self.norm(name="pool_bn", activation=self.act)(x, train)
        elif self.pool != "none":
            raise ValueError(f"unknown stem pool {self.pool!r}; choose max, conv or none")
        return x


class Shortcut(nn.Module):
    """The identity path of a residual block when its shape changes.

    ``kind``:
      * ``projection``: 1x1 conv with the block's stride (``conv``) + BN (``bn``):
        the paper's option B, torchvision's default.
      * ``avg_down``: 2x2 average pool with the stride, then a 1x1/1 conv + BN
        (ResNet-D, Bag of Tricks; timm's ``avg_down=True``).
      * ``zero_pad``: the paper's option A for CIFAR: subsample by the stride and pad
        the new channels with zeros; no parameters.
    """

    kind: str
    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: Array, train: bool, deferred: bool = False,
                 subsampled: Array | None = None) -> Array | ShortcutProjection:
        """The shortcut's output; ``deferred`` (a projection or ``avg_down``): a
        :class:`ShortcutProjection` for the block's last BatchNorm to compute (the same
        parameters). ``subsampled``: ``x[:, ::s, ::s, :]`` already taken by the caller
        (:func:`subsample_fanout`), used where :func:`shortcut_subsamples` says the shortcut
        subsamples x itself."""
        if deferred and self.kind not in ("projection", "avg_down"):
            raise ValueError(f"Shortcut: deferred=True needs a projection or avg_down shortcut, not {self.kind!r}")
        if self.kind == "zero_pad":
            x = x[:, :: self.strides, :: self.strides, :]
            extra = self.features - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        if self.kind == "avg_down":
            x, strides = avg_pool_ceil(x, self.strides), 1
        elif self.kind == "projection":
            strides = self.strides
        else:
            raise ValueError(
                f"unknown shortcut {self.kind!r}; choose projection, avg_down or zero_pad"
            )
        if (FUSE_SHORTCUT and train) or deferred:
            # A 1x1 convolution of stride s (padding 0) reads every s-th pixel: subsample, then
            # run the stride-1 op (change 13). The subsampled x is kept for the backward pass.
            if strides > 1:
                x = x[:, ::strides, ::strides, :] if subsampled is None else subsampled
            kernel = Conv1x1Kernel(self.features, conv_param_dtype(self.conv), name="conv")(x.shape[-1])
            projection = ShortcutProjection(x, kernel, self.norm(name="bn"))
            return projection if deferred else projection.apply(train)
        x = self.conv(self.features, kernel_size=1, strides=strides, name="conv")(x)
        return self.norm(name="bn")(x, train)


def shortcut_subsamples(kind: str, strides: int, train: bool, deferred: bool) -> bool:
    """Whether ``Shortcut(kind, strides=strides)(x, train, deferred)`` takes every s-th pixel of
    x itself (a strided projection on the path of changes 13 and 17) rather than running a
    strided convolution: then a block can hand it that subsample from :func:`subsample_fanout`."""
    return kind == "projection" and strides > 1 and ((FUSE_SHORTCUT and train) or deferred)


def subsample_fanout(x: Array, stride: int) -> tuple[Array, Array]:
    """``(x, x[:, ::stride, ::stride, :])`` of an NHWC x: the block input that the residual
    branch reads whole and a projection shortcut reads every ``stride``-th pixel of.

    The values, and the gradient of x (the branch's gradient plus the shortcut's at the
    subsampled pixels), are plain slicing's. Only the reverse pass's cost differs: it adds the
    shortcut's gradient into the branch's in place, an XLA scatter that reads and writes
    1/stride^2 of x, where slicing's transpose pads it to x's size (one kernel writing all of x)
    and adds it everywhere (a second read of all of x). A ``linear_call``: forward and reverse
    mode both work.
    """

    def both(_, x):
        return x, x[:, ::stride, ::stride, :]

    def add_at_subsample(_, cotangents):
        g, g_sub = cotangents
        return g.at[:, ::stride, ::stride, :].add(g_sub.astype(g.dtype), indices_are_sorted=True,
                                                  unique_indices=True)

    return jax.custom_derivatives.linear_call(both, add_at_subsample, (), x)


def stage_drop_path_rates(stage_sizes: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Per-block stochastic-depth rates rising linearly from 0 to ``drop_path_rate``.

    Block ``i`` of ``n`` (counted over the whole network) gets ``rate * i / (n - 1)``,
    as timm does.
    """
    total = sum(stage_sizes)
    rates, index = [], 0
    for size in stage_sizes:
        rates.append([drop_path_rate * (index + j) / max(total - 1, 1) for j in range(size)])
        index += size
    return rates
