"""Weight import from real torchvision and timm modules: logit and feature parity, files, errors.

The peers are the real libraries (the test extra installs torch, torchvision and
timm), randomly initialised with randomised BatchNorm statistics, in eval mode.
"""

import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")

from resnet_jax.models import create_model  # noqa: E402
from resnet_jax.models.convert import (  # noqa: E402
    ConversionError,
    convert_state_dict,
    load_pretrained,
    read_weights,
)
from resnet_jax.models.torch_reference import create_torch_model, relative_error, torch_outputs  # noqa: E402

# Every distinct architecture feature: basic/bottleneck, groups, width, deep stem,
# avg-pool shortcuts, SE, ResNet-RS stem pool; full widths at a small resolution.
CASES = [
    ("torchvision", "resnet18"),
    ("torchvision", "resnet50"),
    ("torchvision", "resnext50_32x4d"),
    ("torchvision", "wide_resnet50_2"),
    ("timm", "resnet18d"),
    ("timm", "resnet50d"),
    ("timm", "seresnet50"),
    ("timm", "seresnext50_32x4d"),
    ("timm", "resnext50d_32x4d"),
    ("timm", "resnetrs50"),
]
TOLERANCE = 1e-4  # max |diff| <= 1e-4 x max |reference|, float32


def _images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("source,name", CASES)
def test_logits_and_stage_features_match_the_torch_model(source, name):
    torch_model = create_torch_model(source, name)
    x = _images(size=64 if name != "resnetrs50" else 80)
    ref_logits, ref_stages = torch_outputs(torch_model, x)
    variables = convert_state_dict(torch_model.state_dict(), name)
    logits, stages = create_model(name).apply(variables, x.transpose(0, 2, 3, 1), train=False, return_stages=True)
    assert relative_error(logits, ref_logits)[1] <= TOLERANCE
    for ours, ref in zip(stages, ref_stages, strict=True):
        assert ours.shape == ref.shape
        assert relative_error(ours, ref)[1] <= TOLERANCE


def test_files_safetensors_and_pth_load_the_same_weights(tmp_path):
    from safetensors.torch import save_file

    torch_model = create_torch_model("torchvision", "resnet18")
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, str(tmp_path / "w.pth"))
    torch.save({"state_dict": state, "epoch": 3}, str(tmp_path / "wrapped.pt"))
    x = _images()
    ref, _ = torch_outputs(torch_model, x)
    for file in ("w.safetensors", "w.pth", "wrapped.pt"):
        model, variables = load_pretrained("resnet18", str(tmp_path / file))
        logits = model.apply(variables, x.transpose(0, 2, 3, 1), train=False)
        assert relative_error(logits, ref)[1] <= TOLERANCE, file


def test_fine_tuning_head_keeps_everything_but_the_classifier(tmp_path):
    torch_model = create_torch_model("timm", "resnet18d")
    torch.save(torch_model.state_dict(), str(tmp_path / "w.pth"))
    model, variables = load_pretrained("resnet18d", str(tmp_path / "w.pth"), num_classes=10)
    full = convert_state_dict(torch_model.state_dict(), "resnet18d")
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    np.testing.assert_array_equal(variables["params"]["stem"]["conv1_0"]["kernel"], full["params"]["stem"]["conv1_0"]["kernel"])
    _, ref_stages = torch_outputs(torch_model, _images())
    _, stages = model.apply(variables, _images().transpose(0, 2, 3, 1), train=False, return_stages=True)
    assert relative_error(stages[-1], ref_stages[-1])[1] <= TOLERANCE


def test_cli_convert_writes_orbax_and_metadata(tmp_path):
    torch_model = create_torch_model("timm", "seresnet50")
    torch.save(torch_model.state_dict(), str(tmp_path / "w.pth"))
    out = tmp_path / "converted"
    run = subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", "convert", "--model", "seresnet50", "--source", "timm",
         "--weights", str(tmp_path / "w.pth"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"] == "seresnet50" and meta["source"] == "timm" and meta["input_size"] == 224
    assert 0 < meta["crop_pct"] <= 1 and len(meta["mean"]) == 3
    model, variables = load_pretrained("seresnet50", str(out))
    ref, _ = torch_outputs(torch_model, _images())
    assert relative_error(model.apply(variables, _images().transpose(0, 2, 3, 1), train=False), ref)[1] <= TOLERANCE


def test_wrong_architecture_names_the_keys():
    state = create_torch_model("torchvision", "resnet18").state_dict()
    with pytest.raises(ConversionError, match=r"model variable\(s\) with no weight: .*layer1_2"):
        convert_state_dict(state, "resnet34")
    with pytest.raises(ConversionError, match=r"shape mismatch.*conv1"):
        convert_state_dict(state, "resnet50")
    with pytest.raises(ConversionError, match=r"no place in the model: conv1.weight"):
        convert_state_dict(state, "resnet18d")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_MARKER",))


def test_bad_files_give_clear_errors_and_never_run_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored afterwards: later tests in this worker use relative paths
    with open("evil.pth", "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(ConversionError, match="weights_only"):
        read_weights("evil.pth")
    assert not os.path.exists("EVIL_MARKER")
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(ConversionError, match="not a readable PyTorch weight file"):
        read_weights(str(tmp_path / "notes.pth"))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1000)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a readable .safetensors"):
        read_weights(str(tmp_path / "cut.safetensors"))
    with pytest.raises(FileNotFoundError):
        read_weights(str(tmp_path / "missing.pth"))


def test_converted_variables_are_float32_numpy_pytrees():
    variables = convert_state_dict(create_torch_model("torchvision", "resnet18").state_dict(), "resnet18")
    leaves = jax.tree_util.tree_leaves(variables)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("kernels", ["default", "cuda"])
def test_training_loss_and_every_gradient_match_torchvision_autograd(name, kernels, monkeypatch):
    """Train mode (BatchNorm over the batch), cross-entropy, float32: for the same weights our
    loss and the gradient of every parameter match torchvision's model under torch.autograd.

    Tolerances: the loss within 1e-5; each parameter's gradient within 1e-3 in relative L2
    norm, all of them together within 1e-4. Not tighter per parameter: a ReLU or max-pool
    input within float32 rounding of its threshold can go either way in two float32
    implementations (both differ from torch's float64 there), which moves the gradients of
    the layers before it by up to ~2e-4; a wrong derivative moves them by O(1).
    ``cuda`` swaps in the kernels the model runs when compiled for an NVIDIA GPU (ReLU
    derivative from its output, the max pool's fused gradient), which a CPU would otherwise
    never run inside a whole model (``jax.lax.platform_dependent``)."""
    import torch.nn.functional as F

    from resnet_jax.train.step import cross_entropy
    from tests.conftest import use_cuda_kernels

    if kernels == "cuda":
        use_cuda_kernels(monkeypatch)
    torch.manual_seed(0)
    torch_model = create_torch_model("torchvision", name).train()
    state_dict = {k: v.clone() for k, v in torch_model.state_dict().items()}
    x = _images(n=4, size=64, seed=3)
    labels = np.array([3, 141, 999, 3])
    torch_loss = F.cross_entropy(torch_model(torch.from_numpy(x)), torch.from_numpy(labels))
    torch_loss.backward()
    grads = {k: p.grad for k, p in torch_model.named_parameters()}
    reference = convert_state_dict({k: grads.get(k, v) for k, v in state_dict.items()}, name)["params"]

    variables = convert_state_dict(state_dict, name)
    model = create_model(name)

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean()

    loss, ours = jax.value_and_grad(loss_fn)(variables["params"])
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    flat_reference = dict(jax.tree_util.tree_leaves_with_path(reference))
    assert len(flat_ours) == len(flat_reference) == len(grads)

    def relative_l2(a, b):
        return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))

    for path, gradient in flat_ours:
        assert relative_l2(gradient, flat_reference[path]) <= 1e-3, jax.tree_util.keystr(path)
    all_ours = np.concatenate([np.ravel(g) for _, g in flat_ours])
    all_reference = np.concatenate([np.ravel(flat_reference[p]) for p, _ in flat_ours])
    assert relative_l2(all_ours, all_reference) <= 1e-4
