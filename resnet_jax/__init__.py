"""resnet-jax: the ResNet family in JAX/Flax, with a sharded trainer and recipes.

``import resnet_jax`` is light: it exposes the model registry only. Training,
data and checkpoint code live in ``resnet_jax.train`` and ``resnet_jax.data``.
"""

from resnet_jax.models import ResNet, create_model, get_spec, list_models


def load_pretrained(name: str, path: str, num_classes: int | None = None, **model_overrides):
    """``(model, variables)`` from converted or torch weights; see
    :func:`resnet_jax.models.convert.load_pretrained`."""
    from resnet_jax.models.convert import load_pretrained as _load

    return _load(name, path, num_classes=num_classes, **model_overrides)

__version__ = "0.1.0"
__all__ = ["ResNet", "__version__", "create_model", "get_spec", "list_models", "load_pretrained"]
