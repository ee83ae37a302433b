"""The commands a user runs, as subprocesses: the README's main job, eval, SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _cli(*args, timeout=600, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, **{"env": ENV, **kwargs},
    )


@pytest.mark.slow
def test_readme_main_command_reaches_97_percent_and_eval_agrees(tmp_path):
    """The README's main job, unchanged: default digits config, full length."""
    workdir = str(tmp_path / "digits")
    run = _cli("train", "--config", "configs/digits.py", "--workdir", workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    match = re.search(r"test accuracy \(top-1\) ([\d.]+)%", run.stdout)
    assert match, run.stdout[-2000:]
    accuracy = float(match.group(1))
    assert accuracy >= 97.0, run.stdout[-2000:]
    assert "(359 examples)" in run.stdout
    for name in ("metrics.jsonl", "config.json", "summary.json", "tensorboard", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    # the summary splits the wall time: first step, training, evaluation (every 2 epochs here)
    # and checkpoints, which add up to it; training throughput leaves out the other three
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    parts = [summary[k] for k in ("first_step_seconds", "train_seconds", "eval_seconds", "checkpoint_seconds")]
    assert all(p > 0 for p in parts) and abs(sum(parts) - summary["seconds"]) < 1e-3, summary
    assert re.search(r"wall time \S+ = first step [\d.]+ s \(setup, compilation\) \+ training [\d.]+ s "
                     r"\+ eval [\d.]+ s \+ checkpoints [\d.]+ s\n training throughput \d+ images/s", run.stdout)
    evaluated = _cli("eval", "--workdir", workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"top-1 {accuracy:.2f}%" in evaluated.stdout
    # predict: three held-out test digits (indices 4, 9, 14 of scikit-learn's order) as PNG files.
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in (4, 9, 14):
        path = str(tmp_path / f"digit{i}.png")
        Image.fromarray((digits.images[i] * 255 / 16).round().astype("uint8")).save(path)
        paths.append(path)
    predicted = _cli("predict", "--workdir", workdir, *paths)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    for path, i in zip(paths, (4, 9, 14)):
        line = next(line for line in predicted.stdout.splitlines() if line.startswith(path))
        assert line.split(": ")[1].split()[0] == str(digits.target[i]), line


@pytest.mark.slow
def test_a_restart_takes_the_train_step_from_the_persistent_compilation_cache(tmp_path):
    """The trainer's persistent compilation cache (on by default): a run stopped after one
    step stores its compiled train step; the restart, same config, resumed from the
    checkpoint, finds it under the same key and stores no second one."""
    cache = tmp_path / "xla"
    args = ("train", "--config", "configs/digits.py:smoke", "--workdir", str(tmp_path / "run"),
            f"--config.compilation_cache_dir={cache}")
    env = {**ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # cache even a fast CPU compile

    def train_steps_cached():
        (folder,) = os.listdir(cache)  # one per library version and Pallas module (loop.enable_compilation_cache)
        assert folder.startswith("resnet_jax-"), folder
        return sorted(name for name in os.listdir(cache / folder) if name.startswith("jit_train_step-"))

    first = _cli(*args, "--config.stop_after_steps=1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    cached = train_steps_cached()
    assert len(cached) == 1, os.listdir(cache)
    restart = _cli(*args, env=env)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "resumed from" in restart.stdout and "finished at step 2/2" in restart.stdout, restart.stdout[-2000:]
    assert train_steps_cached() == cached


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "configs/digits.py", "--workdir", workdir,
         "--config.log_every_steps=5", "--config.checkpoint_every_steps=100000", "--config.eval_every_epochs=1000"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and "/330" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "preempted at step" in out, out
    step = int(re.search(r"preempted at step (\d+)/330", out).group(1))
    assert 0 < step < 330
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
    resumed = _cli("train", "--config", "configs/digits.py", "--workdir", workdir, "--config.stop_after_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/{step}" in resumed.stdout
    assert f"stopped at step {step + 2}/330" in resumed.stdout


def test_bad_input_gives_a_clear_error_without_traceback(tmp_path):
    run = _cli("train", "--config", "configs/digits.py:smoke", "--workdir", str(tmp_path),
               "--config.data.batch_size=100000")
    assert run.returncode == 2
    assert "1438 training examples per process, fewer than the per-process batch of 100000" in run.stderr
    assert "Traceback" not in run.stderr
    run = _cli("train", "--config", "configs/digits.py:smoke", "--workdir", str(tmp_path),
               "--config.data.name=not_a_dataset")
    assert run.returncode == 2 and "unknown dataset 'not_a_dataset'" in run.stderr
    assert "digits" in run.stderr and "Traceback" not in run.stderr
    run = _cli("eval", "--workdir", str(tmp_path / "nothing"))
    assert run.returncode == 2 and "no checkpoints in" in run.stderr
    run = _cli("benchmark", "--steps-per-dispatch", "0")
    assert run.returncode == 2 and "--steps-per-dispatch: must be a positive integer, got 0" in run.stderr


def test_missing_data_file_is_named_and_checkpoints_are_untouched(tmp_path):
    data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
    args = ["train", "--config", "configs/digits.py:smoke", "--workdir", workdir, f"--config.data.data_dir={data_dir}"]
    assert _cli(*args).returncode == 0
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    shard = next(f for f in os.listdir(os.path.join(data_dir, "digits", "1.0.0")) if "train.tfrecord" in f)
    os.remove(os.path.join(data_dir, "digits", "1.0.0", shard))
    run = _cli(*args, "--config.num_train_steps=4")
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"data file {os.path.join(data_dir, 'digits', '1.0.0', shard)} of digits is missing" in run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=6m tmpfs "$DISK"
"$PYTHON" -c "$ENTRY" train $ARGS --config.num_train_steps=6
echo "first exit $?"
ls "$DISK/run/checkpoints"
mount -o remount,size=64m "$DISK"   # the user frees space
"$PYTHON" -c "$ENTRY" train $ARGS --config.num_train_steps=6
echo "second exit $?"
"""
# Runs the CLI; with PATCH_SIZE=1 the free-space check is told the checkpoint is empty, so the
# save starts and the write itself fails part-way with ENOSPC from the filesystem.
ENTRY = """
import os, sys
import resnet_jax.train.checkpoint as checkpoint
if os.environ.get("PATCH_SIZE") == "1":
    checkpoint.checkpoint_bytes = lambda state: 0
from resnet_jax.main_flags import run
sys.exit(run(sys.argv[1], sys.argv[2:]))
"""


def _run_on_small_disk(tmp_path, patch_size: bool) -> str:
    disk = tmp_path / "disk"
    disk.mkdir()
    args = (f"--config configs/digits.py:smoke --workdir {disk}/run --config.checkpoint_every_steps=1 "
            "--config.log_every_steps=1")
    env = {**ENV, "DISK": str(disk), "PYTHON": sys.executable, "ENTRY": ENTRY, "ARGS": args,
           "PATCH_SIZE": "1" if patch_size else "0"}
    run = subprocess.run(["unshare", "-m", "bash", "-c", FULL_DISK_SCRIPT], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return run.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs in a mount namespace")
@pytest.mark.parametrize("where", ["refused before writing", "failed while writing"])
def test_a_full_disk_on_save_is_named_and_keeps_earlier_checkpoints(tmp_path, where):
    """A 6 MB filesystem holds two checkpoints of the digits ResNet-20 (2.2 MB each on disk; the
    pre-save check asks for 3.4 MB free, arrays plus margins), not three."""
    out = _run_on_small_disk(tmp_path, patch_size=where == "failed while writing")
    assert "first exit 5" in out, out[-4000:]
    if where == "refused before writing":
        assert "not enough disk space to save the checkpoint of step 3" in out, out[-4000:]
        assert "Nothing was written" in out
    else:
        assert "could not write the checkpoint of step 3" in out, out[-4000:]
        assert "No space left on device (errno 28). The partial files were removed." in out
    assert "The newest complete checkpoint, step 2, is untouched" in out
    first_run_stderr = out.split("write error:")[1].split("second exit")[0]
    assert "Traceback" not in first_run_stderr, first_run_stderr[:3000]
    listing = out.split("first exit 5\n")[1].split("\n")
    assert listing[:2] == ["1", "2"] and "orbax-checkpoint-tmp" not in listing[2], listing
    # After the user frees space the same command resumes from step 2 and finishes.
    assert "second exit 0" in out, out[-4000:]
    assert f"resumed from {tmp_path}/disk/run/checkpoints/2" in out
    assert "stopped at step 6/" in out or "finished at step 6/" in out, out[-3000:]
