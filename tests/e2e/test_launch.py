"""The GPU-cluster launch scripts, run as written on this host.

``launch/slurm_gpu.sbatch`` runs under a stand-in ``srun`` (tests/e2e/fake_srun) that
starts SLURM_NTASKS local copies with SLURM's per-task variables, so JAX's own SLURM
detection forms the cluster, and a stand-in ``scontrol`` that records requeue requests; ``launch/multinode.sh`` runs twice with an explicit
localhost coordinator. ``launch/tpu_vm.sh`` runs against a stand-in ``gcloud``
(tests/e2e/fake_gcloud) that records each call and runs the ``ssh`` payload here, as one
worker would; real Cloud TPUs are not reachable from here.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)  # where pip put the `resnet-jax` entry point


def _env(tmp_path, devices=2, **extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PATH": f"{tmp_path / 'bin'}:{BIN}:{os.environ['PATH']}", "RESNET_JAX_HEARTBEAT_TIMEOUT": "30"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_id_with_free_port() -> int:
    """JAX derives the coordinator port from SLURM_JOB_ID (61440 + id % 4096): pick a free one."""
    for job_id in random.sample(range(4096), 4096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in 61440-65535")


def _start_slurm(tmp_path, *extra_args, job_id=None):
    """Runs launch/slurm_gpu.sbatch as a 2-task job under the stand-in srun and scontrol."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        shutil.copy(os.path.join(ROOT, "tests", "e2e", f"fake_{tool}"), tmp_path / "bin" / tool)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    job_id = job_id if job_id is not None else _job_id_with_free_port()
    env = _env(tmp_path, SRUN_LOG_DIR=logs, SLURM_JOB_ID=job_id, SLURM_NTASKS=2,
               SLURM_STEP_NODELIST="localhost", DATA_DIR=tmp_path / "tfds")
    return subprocess.Popen(["bash", "launch/slurm_gpu.sbatch", "configs/digits.py:smoke", str(tmp_path / "run"),
                             *extra_args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), logs, job_id


def _slurm(tmp_path, *extra_args, job_id=None):
    start = time.time()
    job, logs, job_id = _start_slurm(tmp_path, *extra_args, job_id=job_id)
    out = job.communicate(timeout=600)[0]
    task_logs = [(logs / f"task{i}.log").read_text() for i in range(2)]
    return job.returncode, task_logs, time.time() - start, out


def _requeues(tmp_path):
    log = tmp_path / "logs" / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_slurm_script_trains_one_job_over_two_tasks(tmp_path):
    code, (log0, log1), _, _ = _slurm(tmp_path)
    assert code == 0, log0[-3000:] + log1[-3000:]
    # One job: 2 processes x 2 devices, digits prepared once (process 0 first, then the other
    # finds it), every eval example counted once, and only process 0 prints progress.
    assert "4 devices, 2 processes" in log0, log0[-3000:]
    assert "finished at step 2/2" in log0 and "(359 examples)" in log0
    assert "step " not in log1 and "finished" not in log1, log1[-2000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
    assert _requeues(tmp_path) == []  # a finished run is not requeued


@pytest.mark.slow
def test_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path):
    # --signal=TERM@120: slurmd sends SIGTERM to every task before the time limit.
    job, logs, job_id = _start_slurm(tmp_path, "--config.num_train_steps=100000", "--config.log_every_steps=1")
    deadline = time.time() + 300
    while "step      1/" not in ((logs / "task0.log").read_text() if (logs / "task0.log").exists() else ""):
        assert job.poll() is None and time.time() < deadline, (logs / "task0.log").read_text()[-3000:]
        time.sleep(0.2)
    for i in range(2):
        os.kill(int((logs / f"task{i}.pid").read_text()), signal.SIGTERM)
    out = job.communicate(timeout=300)[0]
    log0 = (logs / "task0.log").read_text()
    assert job.returncode == 0, out[-2000:] + log0[-3000:]
    stopped_at = int(log0.split("preempted at step ")[1].split("/")[0])
    assert _requeues(tmp_path) == [f"requeue {job_id}"], out
    # SLURM starts the requeued job with the same script, job id and arguments.
    code, (log0, _), _, _ = _slurm(tmp_path, "--config.num_train_steps=100000", "--config.log_every_steps=1",
                                   "--config.stop_after_steps=2", job_id=job_id)
    assert code == 0, log0[-3000:]
    assert f"resumed from {tmp_path / 'run'}/checkpoints/{stopped_at}" in log0, log0[-3000:]
    assert f"stopped at step {stopped_at + 2}/100000" in log0
    assert len(_requeues(tmp_path)) == 1  # stopped on purpose (stop_after_steps): not requeued


@pytest.mark.slow
def test_slurm_job_fails_fast_and_clearly_when_a_task_fails(tmp_path):
    code, (log0, log1), seconds, _ = _slurm(tmp_path, "--config.data.name=not_a_dataset")
    assert code != 0
    assert "unknown dataset 'not_a_dataset'" in log0, log0[-2000:]
    # Process 0 fails before the others pass the data barrier; it exits at once instead of
    # waiting in JAX's 5-minute shutdown barrier, and srun --kill-on-bad-exit stops the rest.
    assert seconds < 120, (seconds, log0[-1500:], log1[-1500:])


@pytest.mark.slow
def test_multinode_script_with_an_explicit_coordinator(tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            ["bash", "launch/multinode.sh", "configs/digits.py:smoke", str(tmp_path / "run"),
             f"--config.data.data_dir={tmp_path / 'tfds'}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(tmp_path, COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES=2, PROCESS_ID=i),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "4 devices, 2 processes" in outs[0] and "finished at step 2/2" in outs[0]


def _tpu_vm(tmp_path, *args, **extra_env):
    (tmp_path / "bin").mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, "tests", "e2e", "fake_gcloud"), tmp_path / "bin" / "gcloud")
    (tmp_path / "home").mkdir(exist_ok=True)
    env = _env(tmp_path, HOME=tmp_path / "home", GCLOUD_LOG=tmp_path / "gcloud.log", GCLOUD_STATE=tmp_path / "qr",
               PROJECT="proj", ZONE="us-central2-b", NAME="rn50", BUCKET=tmp_path / "bucket", RUN="r1", **extra_env)
    run = subprocess.run(["bash", "launch/tpu_vm.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    calls = (tmp_path / "gcloud.log").read_text().splitlines() if (tmp_path / "gcloud.log").exists() else []
    (tmp_path / "gcloud.log").unlink(missing_ok=True)
    return run, calls


def test_tpu_vm_create_picks_the_runtime_and_recreates_a_preempted_spot_slice(tmp_path):
    where = "--project proj --zone us-central2-b"
    run, calls = _tpu_vm(tmp_path, "create", TYPE="v6e-8", SPOT="1")
    assert run.returncode == 0, run.stderr
    assert (f"gcloud compute tpus queued-resources create rn50 {where} --node-id rn50 --accelerator-type v6e-8 "
            "--runtime-version v2-alpha-tpuv6e --spot") in calls
    assert "rn50 is ACTIVE" in run.stdout
    run, calls = _tpu_vm(tmp_path, "create", TYPE="v6e-8", SPOT="1")  # already there: nothing created
    assert run.returncode == 0 and "already ACTIVE" in run.stdout and not any(" create " in c for c in calls)
    (tmp_path / "qr").write_text("SUSPENDED\n")  # spot preemption
    run, calls = _tpu_vm(tmp_path, "create", TYPE="v6e-8", SPOT="1")
    assert run.returncode == 0, run.stderr
    kinds = [c.split()[4] for c in calls if "queued-resources" in c and "describe" not in c]
    assert kinds == ["delete", "create"], calls
    for tpu_type, runtime in (("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
                              ("v4-32", "tpu-ubuntu2204-base")):
        (tmp_path / "qr").unlink()
        _, calls = _tpu_vm(tmp_path, "create", TYPE=tpu_type)
        assert any(f"--accelerator-type {tpu_type} --runtime-version {runtime}" in c and "--spot" not in c
                   for c in calls), calls


@pytest.mark.slow
def test_tpu_vm_install_ships_the_checkout_and_train_runs_the_trainer_on_every_worker(tmp_path):
    run, calls = _tpu_vm(tmp_path, "install", GCLOUD_SSH_DRY="1")
    assert run.returncode == 0, run.stderr
    assert any(c.startswith("gcloud compute tpus tpu-vm scp /tmp/resnet-jax.tar.gz rn50:") and "--worker=all" in c
               for c in calls)
    assert any("--worker=all" in c and "pip install -e . 'jax[tpu]'" in c for c in calls), calls
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "home" / "resnet-jax.tar.gz")], capture_output=True,
                             text=True).stdout.split()
    assert "pyproject.toml" in listing and "resnet_jax/train/loop.py" in listing
    # train: the ssh payload, run here as one worker would, trains with the workdir and data in the bucket.
    os.symlink(ROOT, tmp_path / "home" / "resnet-jax")
    run, calls = _tpu_vm(tmp_path, "train", "configs/digits.py:smoke", "--config.compilation_cache_dir=")
    assert run.returncode == 0, run.stderr
    assert any("--worker=all" in c and "resnet-jax train --config configs/digits.py:smoke" in c for c in calls)
    log = tmp_path / "home" / "train-r1.log"
    deadline = time.time() + 300
    while "finished at step 2/2" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.5)
    assert os.path.isdir(tmp_path / "bucket" / "runs" / "rn50" / "checkpoints" / "2")
    assert os.path.isdir(tmp_path / "bucket" / "tfds" / "digits")
