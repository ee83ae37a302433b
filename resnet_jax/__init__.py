"""resnet-jax: the ResNet family in JAX/Flax, with a sharded trainer and recipes.

``import resnet_jax`` is light: it exposes the model registry only. Training,
data and checkpoint code live in ``resnet_jax.train`` and ``resnet_jax.data``.
"""

from resnet_jax.models import ResNet, create_model, get_spec, list_models

__version__ = "0.1.0"
__all__ = ["ResNet", "__version__", "create_model", "get_spec", "list_models"]
