"""Multi-process training on one CPU host: two JAX processes (a localhost coordinator,
gloo collectives), each with 4 virtual devices, running the real `resnet-jax train`."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax.train import checkpoint as ckpt_lib
from resnet_jax.train.loop import setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = ["--config", "configs/imagenet_resnet.py:smoke", "--config.num_train_steps=4", "--config.log_every_steps=1",
         "--config.compilation_cache_dir="]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices, process_id=None, num_processes=None, port=None, **extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    if num_processes:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id))
    return env


def _launch(workdir, processes, devices_per_process, extra_args=(), env_extra=None, wait=True):
    port = _free_port()
    cmd = [sys.executable, "-m", "resnet_jax.cli", "train", *SMOKE, "--workdir", str(workdir), *extra_args]
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(devices_per_process, i, processes if processes > 1 else None, port, **(env_extra or {})),
        )
        for i in range(processes)
    ]
    if not wait:
        return procs
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _final_state(workdir, step=4):
    spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "imagenet_resnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.num_train_steps = 4
    s = setup(config, devices=jax.devices()[:8])
    checkpointer = ckpt_lib.Checkpointer(str(workdir), read_only=True)
    state, _ = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding))
    checkpointer.close()
    return state


def _assert_close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_checkpoints_cross_over(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, 1, 8)
    outs = _launch(two, 2, 4)
    assert "2 processes" in outs[0] and "step" not in outs[1].split("2 processes")[-1][:0]
    # Only process 0 logs training lines.
    assert "step      1/4" in outs[0] and "step      1/4" not in outs[1]
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    _assert_close(_final_state(two), _final_state(one))
    # A checkpoint written by two processes resumes in one, and the reverse.
    two_then_one, one_then_two = tmp_path / "21", tmp_path / "12"
    _launch(two_then_one, 2, 4, ["--config.stop_after_steps=2"])
    out = _launch(two_then_one, 1, 8)[0]
    assert "resumed from" in out
    _launch(one_then_two, 1, 8, ["--config.stop_after_steps=2"])
    out = _launch(one_then_two, 2, 4)[0]
    assert "resumed from" in out
    reference = _final_state(one)
    _assert_close(_final_state(two_then_one), reference)
    _assert_close(_final_state(one_then_two), reference)


@pytest.mark.slow
def test_digits_trains_in_two_processes_and_counts_every_eval_example(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "configs/digits.py", "--workdir",
           str(tmp_path), "--config.num_epochs=2", "--config.compilation_cache_dir=", "--config.eval_every_epochs=2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(2, i, 2, port)) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "(359 examples)" in outs[0] and "2 processes" in outs[0]


@pytest.mark.slow
def test_a_dead_process_makes_the_other_fail_within_bounded_time(tmp_path):
    procs = _launch(tmp_path, 2, 4, ["--config.num_train_steps=100000"],
                    env_extra={"RESNET_JAX_HEARTBEAT_TIMEOUT": "10"}, wait=False)
    deadline = time.time() + 300
    for line in procs[0].stdout:
        if line.startswith("step "):
            break
        assert time.time() < deadline
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    try:
        out = procs[0].communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung for 120 s after its peer died")
    assert procs[0].returncode != 0
    assert time.time() - start < 120
    assert "stopped sending heartbeats" in out, out[-4000:]  # JAX names the dead peer


@pytest.mark.slow
def test_fault_injection_kills_and_restarts_reproduce_the_uninterrupted_run(tmp_path):
    """SIGKILL (often inside an async save) and SIGTERM at random steps, then resume:
    the final parameters equal those of an uninterrupted run bit for bit."""
    run = subprocess.run(
        [sys.executable, "launch/fault_injection.py", "--kills", "4", "--steps", "14", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env(1),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final state IDENTICAL" in run.stdout


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes_exactly(tmp_path):
    """A preemption notice that reaches one host only (a maintenance event, a stray kill):
    JAX's preemption service tells the others, all save the same step and exit 0 (a
    process that saved alone would leave its peer hanging in the next collective), and
    the restarted job ends with exactly the parameters of an uninterrupted one."""
    args = ["--config.num_train_steps=12", "--config.log_every_steps=2", "--config.eval_every_epochs=100",
            "--config.checkpoint_every_steps=1000"]
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    _launch(reference, 2, 4, args)
    procs = _launch(preempted, 2, 4, args, wait=False)
    head = []
    deadline = time.time() + 300
    for line in procs[0].stdout:
        head.append(line)
        if line.startswith("step      2/12"):
            break
        assert time.time() < deadline, "".join(head)[-3000:]
    procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 is never signalled
    start = time.time()
    try:
        outs = ["".join(head) + procs[0].communicate(timeout=120)[0], procs[1].communicate(timeout=120)[0]]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the job hung after SIGTERM reached one of its processes")
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert time.time() - start < 120
    stopped_at = int(outs[0].split("preempted at step ")[1].split("/")[0])
    assert 2 <= stopped_at < 12, outs[0][-2000:]
    assert f"checkpoint of step {stopped_at} saved" in outs[0]
    assert sorted(os.listdir(preempted / "checkpoints")) == [str(stopped_at)]
    out = _launch(preempted, 2, 4, args)[0]
    assert f"resumed from {preempted}/checkpoints/{stopped_at}" in out and "finished at step 12/12" in out
    for x, y in zip(jax.tree_util.tree_leaves(_final_state(preempted, 12)),
                    jax.tree_util.tree_leaves(_final_state(reference, 12))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
