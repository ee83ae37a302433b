"""Helpers to compare our models with torchvision/timm ones (tests and the parity sweep).

Imports torch, torchvision and timm on use; install them with ``pip install
'resnet-jax[torch]' torchvision timm``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def create_torch_model(source: str, name: str) -> Any:
    """A randomly initialised torchvision or timm model, in eval mode, with BatchNorm
    running statistics and affine parameters randomised (so eval mode is really tested).

    The last BatchNorm of each residual block gets a scale in [0, 0.2], as trained
    networks have small residual branches: with scales near 1 the activations of a
    100-block SE network grow ~1e4x and a float32 comparison turns chaotic (the SE
    gates amplify rounding differences), which would test conditioning, not mapping.
    """
    import torch

    if source == "torchvision":
        import torchvision

        model = getattr(torchvision.models, name)()
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        raise ValueError(f"unknown source {source!r}; choose torchvision or timm")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.75 + 0.5 * torch.rand(shape, generator=generator))
                module.weight.copy_(0.75 + 0.5 * torch.rand(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
        for stage in range(1, 5):
            for block in getattr(model, f"layer{stage}"):
                last = block.bn3 if hasattr(block, "bn3") else block.bn2
                last.weight.copy_(0.2 * torch.rand(last.weight.shape, generator=generator))
    return model.eval()


def torch_outputs(model: Any, images_nchw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the outputs of ``layer1``..``layer4`` (as NHWC numpy arrays)."""
    import torch

    stages: list[np.ndarray] = []
    hooks = [
        getattr(model, f"layer{i}").register_forward_hook(
            lambda _m, _i, out: stages.append(out.detach().numpy().transpose(0, 2, 3, 1))
        )
        for i in range(1, 5)
    ]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(images_nchw)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, stages


def relative_error(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(max |diff|, max |diff| / max |reference|)``."""
    diff = float(np.abs(np.asarray(ours, np.float64) - reference).max())
    return diff, diff / max(float(np.abs(reference).max()), 1e-12)
