"""Flax linen ResNets: the generic module, its parts and the named registry.

Importing this package pulls in neither TensorFlow, Orbax nor torch.
"""

from resnet_jax.models.blocks import BasicBlock, Bottleneck
from resnet_jax.models.complexity import model_macs, model_params
from resnet_jax.models.layers import BatchNorm, SqueezeExcite
from resnet_jax.models.registry import ModelSpec, create_model, get_spec, list_models
from resnet_jax.models.resnet import ResNet

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ModelSpec",
    "ResNet",
    "SqueezeExcite",
    "create_model",
    "get_spec",
    "list_models",
    "model_macs",
    "model_params",
]
