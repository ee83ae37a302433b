"""The plain Flax peer (benchmarks/peer_flax.py) is the ResNet that torchvision and the paper describe,
its step trains, and compiled for an H100 our step moves fewer bytes and keeps less memory than it."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.peer_flax import init_state, make_model, make_train_step
from resnet_jax.models import model_macs
from resnet_jax.models.complexity import model_params
from tests.conftest import require_cuda_plugin

# torchvision's model table (parameters; GFLOPS there are multiply-adds at 224px).
TORCHVISION = {"resnet18": (11_689_512, 1.81), "resnet50": (25_557_032, 4.09), "resnet101": (44_549_160, 7.80)}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_peer_has_torchvisions_parameters_and_multiply_adds(name):
    params, gmacs = TORCHVISION[name]
    peer = make_model(name, "float32")
    assert model_params(peer) == params
    assert round(model_macs(peer, 224) / 1e9, 2) == gmacs


def test_peer_step_fits_one_batch():
    """Five steps on one batch of 8 (32px, resnet18, float32, learning rate 0.1) lower the loss."""
    net = make_model("resnet18", "float32", num_classes=10)
    step, tx = make_train_step(net)
    state = init_state(net, tx, 32)
    batch = {"image": jax.random.normal(jax.random.key(0), (8, 32, 32, 3)), "label": jnp.arange(8) % 10}
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(jnp.isfinite(jnp.array(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_on_an_h100_our_resnet50_step_moves_fewer_bytes_and_keeps_less_than_plain_flax():
    """The README's claim at its own setting: ResNet-50, batch 256, 224px, bf16, compiled for an H100."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report

    ours, _ = compile_report("resnet50", 256, 224, "bfloat16")
    peer, _ = compile_report("resnet50", 256, 224, "bfloat16", peer="flax")
    assert ours["traffic_gib"] < 0.95 * peer["traffic_gib"], (ours["traffic_gib"], peer["traffic_gib"])
    assert ours["peak_gib"] < peer["peak_gib"], (ours["peak_gib"], peer["peak_gib"])
