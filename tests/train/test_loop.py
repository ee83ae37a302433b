"""The outer loop: determinism, exact resume, resharding, eval coverage, bad states."""

import json
import os

import jax
import numpy as np
import pytest

from resnet_jax.train import checkpoint as ckpt_lib
from resnet_jax.train.loop import setup, train_and_evaluate
from tests.conftest import tiny_config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _restore(workdir, config, step, devices=None):
    s = setup(config, devices=devices)
    abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding)
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    state, position = checkpointer.restore(step, abstract)
    checkpointer.close()
    return state, position


def _assert_same_state(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_same_seed_same_losses_and_resume_equals_uninterrupted(tmp_path):
    full, again, resumed = (str(tmp_path / n) for n in ("full", "again", "resumed"))
    summary = train_and_evaluate(tiny_config(), full)
    train_and_evaluate(tiny_config(), again)
    assert _losses(full) == _losses(again)
    # 3 steps, a new process-level start (fresh setup, restore), then the rest.
    first = train_and_evaluate(tiny_config(stop_after_steps=3), resumed)
    assert first["status"] == "stopped" and first["step"] == 3
    with open(os.path.join(resumed, "summary.json")) as f:  # what job scripts read
        assert json.load(f) == json.loads(json.dumps(first, default=str))
    second = train_and_evaluate(tiny_config(), resumed)
    assert second["status"] == "finished" and second["step"] == summary["step"] == 8
    state_full, pos_full = _restore(full, tiny_config(), 8)
    state_resumed, pos_resumed = _restore(resumed, tiny_config(), 8)
    _assert_same_state(state_full, state_resumed)
    assert pos_full == pos_resumed == {"examples_seen": 8 * 16, "epoch": 2.0}
    assert second["eval"] == summary["eval"]


@pytest.mark.slow
def test_eval_counts_every_example_of_an_uneven_split(tmp_path):
    # 37 eval examples, eval batch 16 over 8 devices: 3 batches, the last with 5 real ones.
    summary = train_and_evaluate(tiny_config(num_train_steps=1), str(tmp_path))
    assert summary["eval"]["examples"] == 37


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_device_count(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(tiny_config(stop_after_steps=3), workdir, devices=jax.devices()[:8])
    on_eight, _ = _restore(workdir, tiny_config(), 3, devices=jax.devices()[:8])
    on_one, _ = _restore(workdir, tiny_config(shard_params=True), 3, devices=jax.devices()[:2])
    _assert_same_state(on_eight, on_one)
    summary = train_and_evaluate(tiny_config(), workdir, devices=jax.devices()[:2])
    assert summary["status"] == "finished"


@pytest.mark.slow
def test_incompatible_config_is_refused_naming_the_field(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(tiny_config(stop_after_steps=2), workdir)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="model.name"):
        train_and_evaluate(tiny_config(**{"model.name": "resnet26"}), workdir)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(
        **{"optimizer.base_lr": 1e30, "schedule.name": "constant", "checkpoint_every_steps": 1,
           "log_every_steps": 1}
    )
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step (\d+)") as err:
        train_and_evaluate(config, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
    assert checkpointer.latest_step() == bad - 1
    checkpointer.close()


def test_free_space_estimate_covers_what_orbax_writes(tmp_path):
    """The pre-save check compares free space with ``checkpoint_bytes``; it must not
    undercount what actually lands on disk (nor overcount grossly and refuse good saves)."""
    config = tiny_config(num_train_steps=1, **{"model.overrides.widths": (32, 32, 32, 32)})
    train_and_evaluate(config, str(tmp_path))
    state, _ = _restore(str(tmp_path), config, 1)
    estimate = ckpt_lib.checkpoint_bytes(state)
    on_disk = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tmp_path / "checkpoints" / "1")
        for f in files
    )
    arrays = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state))  # independent count
    assert estimate == arrays
    budget = ckpt_lib.space_needed(state)
    assert 0.9 * estimate < on_disk <= budget, (estimate, on_disk, budget)


def test_free_space_margin_does_not_refuse_a_resnet50_save_that_fits():
    """The margins stay small beside a real model's state: ResNet-50's parameters, their
    momentum and their EMA (3 x 25.56M float32 values = 307 MB) and its BatchNorm statistics
    (0.4 MB) need at most 5% more room than their bytes."""
    config = tiny_config(**{"model.name": "resnet50", "ema_decay": 0.9999, "data.num_classes": 1000})
    config.model.overrides = {}
    state = setup(config).abstract_state
    arrays = ckpt_lib.checkpoint_bytes(state)
    assert 306e6 < arrays < 308e6, arrays  # He et al.'s ResNet-50: 25,557,032 parameters
    assert ckpt_lib.space_needed(state) <= 1.05 * arrays


def test_os_error_codes_are_found_in_orbax_and_tensorstore_errors():
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.fc.bias/0" in OCDBT database: '
                             "Failed to write 37180 bytes to file 5: No space left on device [os_error_code='28']")
    assert ckpt_lib._os_error_code(tensorstore) == 28
    try:
        try:
            raise PermissionError(13, "Permission denied", "/ckpt")
        except PermissionError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert ckpt_lib._os_error_code(outer) == 13
    assert ckpt_lib._os_error_code(ValueError("shapes do not match")) is None


_SHARDED_KERNEL_PROGRAM = """
import os, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from resnet_jax.models import pallas_batch_norm
from resnet_jax.train.loop import enable_compilation_cache

folder = enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("data", None)))
# the BatchNorm statistics' custom_partitioning op (its kernel under the interpreter), batch-sharded
jax.jit(lambda x: pallas_batch_norm.batch_moments(x, jnp.float32, True)[0] * 2)(x).block_until_ready()
print(folder)
"""


def test_a_new_process_finds_the_batch_sharded_kernels_step_in_the_compilation_cache(tmp_path):
    """The step's BatchNorm sums are custom_partitioning ops, whose cache key held a pointer to
    their Python callbacks, so that every new process missed the cache (checked: without
    ``jax_remove_custom_partitioning_ptr_from_cache_key`` the second run stores a second
    program). With ``enable_compilation_cache`` a second process finds the first's program,
    in a folder named by the library's version and the Pallas module's digest."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.getcwd()}

    def run() -> tuple[str, list[str]]:
        out = subprocess.run([sys.executable, "-c", _SHARDED_KERNEL_PROGRAM, str(tmp_path / "xla")], env=env,
                             capture_output=True, text=True, check=True, timeout=300)
        folder = out.stdout.strip().splitlines()[-1]
        return folder, sorted(name for name in os.listdir(folder) if name.startswith("jit__lambda-"))

    folder, first = run()
    assert os.path.basename(folder).startswith("resnet_jax-") and len(first) == 1, (folder, first)
    assert run() == (folder, first)
