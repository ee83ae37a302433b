"""Named models: each is a few lines of data over the generic :class:`ResNet`.

Names follow timm wherever timm has the model (``resnet50``, ``resnet50d``,
``seresnext50_32x4d``, ``resnetrs101``, ...). The CIFAR networks of the paper are
``resnet20/32/44/56/110`` and their plain counterparts ``plain20/...``.

    >>> model = create_model("resnet50d", num_classes=10, dtype=jnp.bfloat16)
    >>> list_models("resnetrs*")
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from resnet_jax.models.resnet import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: the ResNet arguments and its preprocessing metadata.

    Attributes:
      name: registry name.
      kwargs: arguments of :class:`ResNet`.
      input_size: default (train) square input resolution in pixels.
      test_input_size: resolution the reference weights are evaluated at.
      crop_pct: centre-crop fraction at evaluation (resize to size / crop_pct, crop).
      interpolation: resize filter of the reference weights (bilinear / bicubic).
      mean / std: per-channel normalisation of [0, 1] RGB inputs.
      description: one line for ``resnet-jax models``.
    """

    name: str
    kwargs: Mapping[str, Any]
    input_size: int = 224
    test_input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""

    @property
    def num_classes(self) -> int:
        return int(self.kwargs.get("num_classes", 1000))


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str = "", **kwargs: Any) -> ModelSpec:
    """Registers ``name``; ``kwargs`` are ResNet arguments plus ModelSpec metadata fields."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    meta_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name", "kwargs"}
    meta = {k: kwargs.pop(k) for k in list(kwargs) if k in meta_fields}
    spec = ModelSpec(name=name, kwargs=kwargs, description=description, **meta)
    _REGISTRY[name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``; unknown names list close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} `resnet-jax models` lists all {len(_REGISTRY)}."
        ) from None


def create_model(name: str, **overrides: Any) -> ResNet:
    """Builds the registered model ``name``; ``overrides`` replace any ResNet argument.

    Example: ``create_model("resnet50", num_classes=10, dtype=jnp.bfloat16,
    drop_path_rate=0.1)``. Unknown argument names raise a ``TypeError`` naming them.
    """
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"create_model({name!r}): unknown argument(s) {unknown}; ResNet takes {sorted(fields)}"
        )
    return ResNet(**{**spec.kwargs, **overrides})


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, in registration order, filtered by a shell-style ``pattern``."""
    names = list(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


# --- ImageNet ResNets (He et al. 2015; torchvision / timm definitions, v1.5 strides) ---
BASIC, BOTTLENECK = "basic", "bottleneck"
DEPTHS = {
    18: ((2, 2, 2, 2), BASIC),
    26: ((2, 2, 2, 2), BOTTLENECK),
    34: ((3, 4, 6, 3), BASIC),
    50: ((3, 4, 6, 3), BOTTLENECK),
    101: ((3, 4, 23, 3), BOTTLENECK),
    152: ((3, 8, 36, 3), BOTTLENECK),
    200: ((3, 24, 36, 3), BOTTLENECK),
}
RESNET_D = dict(stem="deep", stem_width=32, shortcut="avg_down")

for _depth, (_sizes, _block) in DEPTHS.items():
    register(
        f"resnet{_depth}", f"ResNet-{_depth}" + (" (v1.5)" if _block == BOTTLENECK else ""),
        stage_sizes=_sizes, block=_block,
    )
    register(
        f"resnet{_depth}d", f"ResNet-{_depth}-D: deep stem, avg-pool shortcuts",
        stage_sizes=_sizes, block=_block, **RESNET_D,
    )

for _depth in (50, 101):
    register(
        f"wide_resnet{_depth}_2", f"Wide ResNet-{_depth}-2",
        stage_sizes=DEPTHS[_depth][0], block=BOTTLENECK, base_width=128,
    )

for _name, _depth, _groups, _width, _extra in (
    ("resnext50_32x4d", 50, 32, 4, {}),
    ("resnext50d_32x4d", 50, 32, 4, RESNET_D),
    ("resnext101_32x8d", 101, 32, 8, {}),
    ("resnext101_64x4d", 101, 64, 4, {}),
):
    register(
        _name, f"ResNeXt-{_depth} {_groups}x{_width}d" + (" (ResNet-D)" if _extra else ""),
        stage_sizes=DEPTHS[_depth][0], block=BOTTLENECK, groups=_groups, base_width=_width,
        **_extra,
    )

for _depth in (50, 101, 152):
    register(
        f"seresnet{_depth}", f"SE-ResNet-{_depth}",
        stage_sizes=DEPTHS[_depth][0], block=BOTTLENECK, se_ratio=1 / 16,
    )
register(
    "seresnext50_32x4d", "SE-ResNeXt-50 32x4d",
    stage_sizes=DEPTHS[50][0], block=BOTTLENECK, groups=32, base_width=4, se_ratio=1 / 16,
)

# --- ResNet-RS (Bello et al. 2021): ResNet-D + SE 0.25 + strided-conv stem pool. ---
# input_size is the train resolution of timm's default weights.
RESNET_RS = {
    50: ((3, 4, 6, 3), 160, 224),
    101: ((3, 4, 23, 3), 192, 288),
    152: ((3, 8, 36, 3), 256, 320),
    200: ((3, 24, 36, 3), 256, 320),
    270: ((4, 29, 53, 4), 256, 320),
    350: ((4, 36, 72, 4), 288, 384),
    420: ((4, 44, 87, 4), 320, 416),
}
for _depth, (_sizes, _train, _test) in RESNET_RS.items():
    register(
        f"resnetrs{_depth}", f"ResNet-RS-{_depth}",
        stage_sizes=_sizes, block=BOTTLENECK, stem_pool="conv", se_ratio=0.25, **RESNET_D,
        input_size=_train, test_input_size=_test, crop_pct=1.0, interpolation="bicubic",
    )

# --- The CIFAR-10 networks of the paper (section 4.2): 6n+2 layers. ---
CIFAR = dict(
    block=BASIC, widths=(16, 32, 64), stem="cifar", stem_width=16, stem_pool="none",
    num_classes=10, zero_init_last=False, input_size=32, test_input_size=32, crop_pct=1.0,
    mean=CIFAR_MEAN, std=CIFAR_STD,
)
for _depth in (20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    register(
        f"resnet{_depth}", f"CIFAR ResNet-{_depth} (option A shortcuts)",
        stage_sizes=(_n, _n, _n), shortcut="zero_pad", **CIFAR,
    )
    register(
        f"plain{_depth}", f"CIFAR plain-{_depth} (no shortcuts)",
        stage_sizes=(_n, _n, _n), shortcut="none", **CIFAR,
    )
