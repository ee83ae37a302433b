"""Import torchvision and timm ResNet-family weights into our Flax variables.

    >>> from resnet_jax.models.convert import convert_state_dict, load_pretrained
    >>> variables = convert_state_dict(torch_model.state_dict(), "resnet50")
    >>> model, variables = load_pretrained("resnet50", "resnet50.safetensors")
    >>> logits = model.apply(variables, images_nhwc, train=False)

Every tensor of the state_dict maps to exactly one of our variables (see
``docs/parameter_names.md``): conv kernels OIHW -> HWIO (grouped convs included),
linear weights (out, in) -> (in, out), BatchNorm weight/bias/running_mean/running_var
-> scale/bias/mean/var (``num_batches_tracked`` has no counterpart and is dropped).
A tensor left over on either side, or a shape that differs, is an error that names
the keys: a partial load never happens silently.

Weight files: ``.safetensors`` (read without torch), or ``.pth``/``.pt``/``.bin``
read with ``torch.load(..., weights_only=True)``, which refuses pickled code. torch
is needed only for those and for in-memory modules (``pip install resnet-jax[torch]``);
nothing else in the package imports it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from resnet_jax.models.complexity import abstract_variables
from resnet_jax.models.registry import create_model, get_spec

# Registry names that exist in each library (our names are timm's; CIFAR nets are ours only).
TORCHVISION_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
TIMM_MODELS = (
    "resnet18", "resnet18d", "resnet26", "resnet26d", "resnet34", "resnet34d", "resnet50", "resnet50d",
    "resnet101", "resnet101d", "resnet152", "resnet152d", "resnet200", "resnet200d",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext50d_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "seresnet50", "seresnet101", "seresnet152", "seresnext50_32x4d",
    "resnetrs50", "resnetrs101", "resnetrs152", "resnetrs200", "resnetrs270", "resnetrs350", "resnetrs420",
)
SOURCES = {"torchvision": TORCHVISION_MODELS, "timm": TIMM_MODELS}
BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# timm's deep stem is nn.Sequential(conv, bn, act, conv, bn, act, conv).
DEEP_STEM = {"0": "conv1_0", "1": "bn1_0", "3": "conv1_1", "4": "bn1_1", "6": "conv1_2"}


class ConversionError(ValueError):
    """The weights do not fit the model: keys left over, missing, or of the wrong shape."""


def _torch_key_to_path(key: str, avg_down: bool) -> tuple[str, ...] | None:
    """Our variable path for a torch state_dict key, e.g. ``layer1.0.bn1.weight`` ->
    ``("params", "layer1_0", "bn1", "scale")``; None for keys we do not map."""
    *module, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return None
    parts: list[str] = []
    if module[0] == "conv1" and len(module) == 2:
        parts, kind = ["stem", DEEP_STEM.get(module[1], "?")], "conv"
        if parts[1].startswith("bn"):
            kind = "bn"
    elif module == ["conv1"]:
        parts, kind = ["stem", "conv1"], "conv"
    elif module == ["bn1"]:
        parts, kind = ["stem", "bn1"], "bn"
    elif module[0] == "maxpool" and len(module) == 2:  # ResNet-RS strided-conv "pool"
        parts, kind = ["stem", {"0": "pool_conv", "1": "pool_bn"}.get(module[1], "?")], "conv"
        if module[1] == "1":
            kind = "bn"
    elif module == ["fc"]:
        parts, kind = ["fc"], "linear"
    elif re.fullmatch(r"layer\d+", module[0]) and len(module) >= 3:
        block = f"{module[0]}_{module[1]}"
        rest = module[2:]
        if rest[0] == "downsample":
            index = int(rest[1]) - (1 if avg_down else 0)
            parts, kind = [block, "downsample", {0: "conv", 1: "bn"}.get(index, "?")], "conv" if index == 0 else "bn"
        elif rest[0] == "se" and len(rest) == 2:
            parts, kind = [block, "se", rest[1]], "conv"
        elif len(rest) == 1 and re.fullmatch(r"(conv|bn)\d", rest[0]):
            parts, kind = [block, rest[0]], "conv" if rest[0].startswith("conv") else "bn"
        else:
            return ("?", key)
    else:
        return ("?", key)
    if kind == "bn":
        collection, name = BN_FIELDS.get(leaf, ("?", leaf))
        return (collection, *parts, name)
    return ("params", *parts, {"weight": "kernel", "bias": "bias"}.get(leaf, "?"))


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 4:  # conv OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if path[-1] == "kernel" and array.ndim == 2:  # linear (out, in) -> (in, out)
        return array.T
    return array


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
        out[key] = np.asarray(value)
    return out


def convert_state_dict(
    state_dict: Mapping[str, Any], model_name: str, skip_head: bool = False, **model_overrides: Any
) -> dict[str, Any]:
    """Our ``{"params", "batch_stats"}`` for ``model_name`` from a torch state_dict.

    ``state_dict`` maps names to torch tensors or numpy arrays. ``skip_head`` leaves
    out the classifier (``fc.*``): the returned variables then lack ``params/fc`` and
    the caller supplies a fresh head (see :func:`load_pretrained`). Raises
    :class:`ConversionError` naming leftover, missing or mis-shaped keys.
    """
    model = create_model(model_name, **model_overrides)
    spec = get_spec(model_name)
    expected = flax.traverse_util.flatten_dict(abstract_variables(model, 64))
    if skip_head:
        expected = {k: v for k, v in expected.items() if k[1] != "fc"}
    avg_down = model.shortcut == "avg_down"
    arrays = _numpy_state_dict(state_dict)
    converted, unmapped, mismatched = {}, [], []
    for key, array in arrays.items():
        if skip_head and key.startswith("fc."):
            continue
        path = _torch_key_to_path(key, avg_down)
        if path is None:
            continue
        if path not in expected:
            unmapped.append(key)
            continue
        array = _to_flax_layout(path, array)
        if tuple(array.shape) != tuple(expected[path].shape):
            mismatched.append(f"{key}: {tuple(array.shape)} vs ours {tuple(expected[path].shape)} at {'/'.join(path)}")
            continue
        converted[path] = array.astype(expected[path].dtype)
    missing = sorted("/".join(p) for p in expected if p not in converted)
    if unmapped or mismatched or missing:
        lines = [f"the weights do not fit {model_name} ({spec.description}):"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:8]))
        if unmapped:
            lines.append(f"  {len(unmapped)} weight key(s) with no place in the model: " + ", ".join(unmapped[:12]))
        if missing:
            lines.append(f"  {len(missing)} model variable(s) with no weight: " + ", ".join(missing[:12]))
        lines.append("  Is this a state_dict of the same architecture (check --model and --source)?")
        raise ConversionError("\n".join(lines))
    return flax.traverse_util.unflatten_dict(converted)


def read_weights(source: Any) -> dict[str, np.ndarray]:
    """A state_dict as numpy arrays from a file path, a torch module or a mapping.

    Files: ``.safetensors`` (no torch needed) or a torch checkpoint read with
    ``weights_only=True``; a checkpoint dict wrapping the weights under
    ``state_dict``/``model``/``state_dict_ema`` is unwrapped.
    """
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return _numpy_state_dict(source.state_dict())
    if isinstance(source, Mapping):
        return _numpy_state_dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file

            return load_file(path)
        except ImportError:
            raise ImportError("reading .safetensors needs `pip install safetensors`") from None
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install 'resnet-jax[torch]'), or convert it to .safetensors"
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} is not a readable PyTorch weight file ({type(e).__name__}: {reason}). "
            "Only plain state_dicts are accepted (torch.load weights_only=True), never pickled code."
        ) from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(loaded, Mapping) and wrapper in loaded and isinstance(loaded[wrapper], Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state_dict of tensors")
    return _numpy_state_dict(loaded)


def preprocessing_metadata(model_name: str) -> dict[str, Any]:
    """Input size, crop fraction, interpolation and mean/std of the reference weights."""
    spec = get_spec(model_name)
    return {
        "model": model_name,
        "input_size": spec.input_size,
        "test_input_size": spec.test_input_size,
        "crop_pct": spec.crop_pct,
        "interpolation": spec.interpolation,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def save_converted(variables: dict[str, Any], out_dir: str, model_name: str, source: str) -> None:
    """Writes ``variables`` as an Orbax checkpoint in ``out_dir/variables`` plus
    ``out_dir/metadata.json`` (model, source, preprocessing)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    target = os.path.join(out_dir, "variables")
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose another --out or remove it")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump({**preprocessing_metadata(model_name), "source": source}, f, indent=2)


def load_pretrained(
    name: str, path: str, num_classes: int | None = None, **model_overrides: Any
) -> tuple[Any, dict[str, Any]]:
    """``(model, variables)`` for registry model ``name`` from converted or torch weights.

    ``path`` is a directory written by ``resnet-jax convert`` or a ``.safetensors`` /
    ``.pth`` file. With ``num_classes`` different from the weights' head, every
    variable but the classifier is loaded and a fresh classifier is initialised (for
    fine-tuning). ``model_overrides`` (e.g. ``dtype=jnp.bfloat16``) go to
    :func:`create_model`.
    """
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        variables = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "variables"))
        variables = jax.tree_util.tree_map(np.asarray, variables)
        head = variables["params"].get("fc", {}).get("kernel")
        weights_classes = 0 if head is None else head.shape[-1]
    else:
        state_dict = read_weights(path)
        weights_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 0
        keep_head = num_classes is None or num_classes == weights_classes
        variables = convert_state_dict(state_dict, name, skip_head=not keep_head, num_classes=weights_classes)
    num_classes = weights_classes if num_classes is None else num_classes
    model = create_model(name, num_classes=num_classes, **model_overrides)
    flat_ref = flax.traverse_util.flatten_dict(abstract_variables(model, 64))
    flat = flax.traverse_util.flatten_dict(variables)
    if num_classes != weights_classes:  # fine-tuning: drop the old head, initialise a new one
        flat = {k: v for k, v in flat.items() if k[1] != "fc"}
        if num_classes:
            fresh = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
            flat.update({k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(fresh).items() if k[1] == "fc"})
    missing = ["/".join(k) for k in flat_ref if k not in flat]
    if missing:
        raise ConversionError(f"{path} lacks variables of {name}: {missing[:8]}")
    for k in flat_ref:
        if flat[k].shape != flat_ref[k].shape:
            raise ConversionError(f"{path}: {'/'.join(k)} has shape {flat[k].shape}, {name} needs {flat_ref[k].shape}")
    return model, flax.traverse_util.unflatten_dict({k: flat[k] for k in flat_ref})
