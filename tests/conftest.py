"""Test setup: 8 virtual CPU devices (for the sharding tests) and no accelerator use."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# triton (pulled in by timm) segfaults when it is first imported after TensorFlow in the
# same process (TF 2.21 / triton of torch 2.14); the suite imports both, so load timm first.
try:
    import timm  # noqa: F401
except ImportError:
    pass


import pytest  # noqa: E402


def tiny_config(**changes):
    """A seconds-fast training config: a narrow ResNet-18 on 16x16 `fake` images."""
    from resnet_jax.train.config import base_config

    c = base_config()
    c.model.name = "resnet18"
    c.model.overrides.widths = (8, 8, 8, 8)
    c.model.overrides.stem_width = 8
    c.data.name = "fake"
    c.data.image_size = 16
    c.data.num_classes = 5
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.data.fake_train_size = 64
    c.data.fake_eval_size = 37  # not divisible by the batch or the device count
    c.num_epochs = 2
    c.log_every_steps = 2
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 3
    c.async_checkpoints = False
    c.compilation_cache_dir = ""
    c.schedule.name = "cosine"
    for key, value in changes.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def require_cuda_plugin() -> None:
    """Skips the calling test unless a jax CUDA plugin is installed (``jax[cuda12-local]``, the
    test extra's, or ``jax[cuda13-local]``, the device image's kind under jax 0.11): the tests
    that compile for an H100 with it, without a GPU or CUDA libraries."""
    import importlib.util

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # no jax_plugins package at all
            return False

    if not any(installed(f"jax_plugins.xla_{cuda}") for cuda in ("cuda12", "cuda13")):
        pytest.skip("needs the CUDA plugin: pip install 'jax[cuda12-local]'")


def use_cuda_kernels(patch, fused_conv: bool = False, fused_conv1: bool = False, fused_bn3: bool = False,
                     input_grad_sums: bool = False, fused_shortcut: bool = False, gram_backward: bool = False,
                     fused_residual: bool = False, fused_projection: bool = False, fused_stem: bool = False):
    """Swaps in, through ``patch`` (a ``pytest.MonkeyPatch``), the kernels a model runs when it is
    compiled for an NVIDIA GPU (``jax.lax.platform_dependent``), which a CPU otherwise never runs
    inside a whole model: the ReLU whose derivative comes from its output, the max pool over
    parity planes, the stem convolution as space to depth, and BatchNorm with whole-batch
    statistics through the Pallas kernels (under the Pallas interpreter). Every CUDA-only
    kernel belongs here, so that the tests using it cover them all. ``fused_conv``: also turn
    on the candidate that fuses a Bottleneck's bn2 + ReLU, conv3 and bn3's statistics
    (``blocks.FUSE_BN2_CONV3``), with its Pallas kernels under the interpreter; ``fused_conv1``:
    the one whose conv1 sums bn1's statistics (``blocks.FUSE_CONV1_BN1``), likewise;
    ``fused_bn3`` (with ``fused_conv``): bn3 in the fused op too (``blocks.FUSE_BN3``);
    ``input_grad_sums`` (with ``fused_bn3``): bn2's backward sums in that op's input-gradient
    GEMM (``pallas_fused_conv.INPUT_GRAD_SUMS``); ``fused_shortcut``: the projection
    shortcuts' convolution and BatchNorm as one op (``layers.FUSE_SHORTCUT``); ``gram_backward``:
    those two ops' BatchNorm gradient taken without reading z (``pallas_fused_conv.GRAM_BACKWARD``);
    ``fused_residual`` (with ``fused_bn3``): the residual add and ReLU in that op too, z never
    stored (``blocks.FUSE_RESIDUAL``); ``fused_projection`` (with ``fused_residual``): a projection
    shortcut computed by that op's GEMM too (``blocks.FUSE_PROJECTION``); ``fused_stem``: the
    classic stem's BatchNorm, max pool and ReLU as one op (``layers.FUSE_STEM_POOL``), its
    backward kernels under the interpreter."""
    import jax.numpy as jnp

    from resnet_jax.models import blocks, layers, pallas_batch_norm, pallas_fused_conv

    def batch_norm_train(x, scale, bias, group, epsilon, dtype, activation=None):
        if group != x.shape[0]:
            return layers.batch_norm_train_xla(x, scale, bias, group, epsilon, dtype, activation)
        return pallas_batch_norm.batch_norm_train(x, scale, bias, epsilon, dtype, activation, interpret=True)

    batch_norm_apply_elsewhere = layers.batch_norm_apply

    def batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype, activation=None):
        if activation not in layers.RELUS:
            return batch_norm_apply_elsewhere(x, mean, var, scale, bias, epsilon, dtype, activation)
        return pallas_batch_norm.bn_relu_apply(x, mean, var, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                               epsilon, dtype, interpret=True)

    patch.setitem(layers.ACTIVATIONS, "relu", layers.relu_from_output)
    patch.setattr(layers, "max_pool_3x3_s2", layers.max_pool_parity)
    patch.setattr(layers, "conv_7x7_s2", layers.conv_7x7_s2_space_to_depth)
    patch.setattr(layers, "_batch_norm_train", batch_norm_train)
    patch.setattr(layers, "batch_norm_apply", batch_norm_apply)
    if fused_conv:
        def fused(x, scale, bias, kernel, group, epsilon, dtype, activation=None, next_norm=None, residual=None,
                  projection=None):
            next_arrays, next_epsilon, shortcut_epsilon = layers.conv1x1_tail_arguments(next_norm, residual,
                                                                                        projection, activation)
            if group != x.shape[0] or activation not in layers.RELUS:
                return layers.batch_norm_conv1x1_layers(x, scale, bias, kernel, *next_arrays, group=group,
                                                        epsilon=epsilon, dtype=dtype, activation=activation,
                                                        next_epsilon=next_epsilon, shortcut_epsilon=shortcut_epsilon)
            return layers.pallas_fused_conv_train(x, scale, bias, kernel, *next_arrays, epsilon=epsilon, dtype=dtype,
                                                  next_epsilon=next_epsilon, shortcut_epsilon=shortcut_epsilon,
                                                  interpret=True)

        patch.setattr(blocks, "FUSE_BN2_CONV3", True)
        patch.setattr(blocks, "FUSE_BN3", fused_bn3)
        patch.setattr(blocks, "FUSE_RESIDUAL", fused_residual)
        patch.setattr(blocks, "FUSE_PROJECTION", fused_projection)
        patch.setattr(pallas_fused_conv, "INPUT_GRAD_SUMS", input_grad_sums)
        patch.setattr(layers, "batch_norm_relu_conv1x1_train", fused)
    if fused_conv1:
        patch.setattr(blocks, "FUSE_CONV1_BN1", True)
        patch.setattr(layers, "conv1x1_train_statistics",
                      lambda x, kernel, dtype: layers.pallas_conv1x1_statistics(x, kernel, dtype=dtype, interpret=True))
    patch.setattr(pallas_fused_conv, "GRAM_BACKWARD", gram_backward)
    patch.setattr(layers, "FUSE_STEM_POOL", fused_stem)
    if fused_shortcut:
        patch.setattr(layers, "FUSE_SHORTCUT", True)
        patch.setattr(layers, "conv1x1_batch_norm_train",
                      lambda x, kernel, scale, bias, epsilon, dtype: layers.pallas_conv1x1_batch_norm(
                          x, kernel, scale, bias, epsilon=epsilon, dtype=dtype, interpret=True))


@pytest.fixture
def make_config():
    return tiny_config
