"""Kill training repeatedly at random points, restart it, and check that the final
state equals an uninterrupted run's, bit for bit.

    python launch/fault_injection.py --kills 10 --steps 40 --workdir /tmp/faults

Each round starts `resnet-jax train` on the same workdir, waits for a random step
(checkpoints are saved asynchronously every step, so many kills land inside a
save), then sends SIGKILL (or SIGTERM, every third round, which must save and exit
0). After the last kill the run is left to finish. The script then restores the
final checkpoint of this run and of an uninterrupted reference run and compares
every array. Exit status 0 means identical; the summary line says how many kills
were survived and how many landed during an asynchronous save.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir: str, steps: int, cache: str) -> list[str]:
    return [
        sys.executable, "-m", "resnet_jax.cli", "train", "--config", "configs/imagenet_resnet.py:smoke",
        "--workdir", workdir, f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1", "--config.async_checkpoints=True", "--config.keep_checkpoints=2",
        f"--config.compilation_cache_dir={cache}",
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def _run_to_end(workdir: str, steps: int, cache: str) -> None:
    run = subprocess.run(_command(workdir, steps, cache), cwd=ROOT, env=_env(), capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def _final_state(workdir: str, steps: int):
    import importlib.util

    import jax

    from resnet_jax.train import checkpoint as ckpt_lib
    from resnet_jax.train.loop import setup

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "imagenet_resnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.num_train_steps = steps
    s = setup(config)
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    assert checkpointer.latest_step() == steps, checkpointer.latest_step()
    state, _ = checkpointer.restore(steps, ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding))
    checkpointer.close()
    return jax.device_get(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/resnet_jax_faults")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    shutil.rmtree(args.workdir, ignore_errors=True)
    reference, faulty = os.path.join(args.workdir, "reference"), os.path.join(args.workdir, "faulty")
    cache = os.path.join(args.workdir, "xla_cache")
    print(f"reference run: {args.steps} steps", flush=True)
    _run_to_end(reference, args.steps, cache)

    kills = terms = during_save = 0
    last_step = 0
    for round_index in range(args.kills):
        proc = subprocess.Popen(_command(faulty, args.steps, cache), cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = rng.randint(1, max(1, args.steps - 2))
        use_term = round_index % 3 == 2
        step = None
        for line in proc.stdout:
            if line.startswith("step "):
                step = int(line.split()[1].split("/")[0])
                if step >= target or step >= last_step + rng.randint(1, 6):
                    break
        if proc.poll() is not None:  # finished before we could kill it
            break
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere, often inside the async save
        ckpt_dir = os.path.join(faulty, "checkpoints")
        saving = os.path.isdir(ckpt_dir) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt_dir))
        proc.send_signal(signal.SIGTERM if use_term else signal.SIGKILL)
        rest = proc.communicate(timeout=300)[0]
        if use_term:
            if proc.returncode != 0 or "preempted at step" not in rest:
                raise SystemExit(f"SIGTERM did not save and exit 0 (rc {proc.returncode}):\n{rest[-3000:]}")
            terms += 1
        else:
            kills += 1
            during_save += saving
        last_step = step or last_step
        print(f"round {round_index + 1}: {'SIGTERM' if use_term else 'SIGKILL'} after step {step}"
              + (" (during an async save)" if saving and not use_term else ""), flush=True)
    _run_to_end(faulty, args.steps, cache)

    import jax
    import numpy as np

    a, b = _final_state(reference, args.steps), _final_state(faulty, args.steps)
    mismatched = [
        i for i, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]
    ok = not mismatched
    print(
        f"fault injection: {kills} SIGKILL ({during_save} during an async save) + {terms} SIGTERM restarts; "
        f"final state {'IDENTICAL to' if ok else f'DIFFERS ({len(mismatched)} arrays) from'} the uninterrupted run",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
