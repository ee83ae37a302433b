"""absl/ml_collections flag handling for the config-driven commands (train, eval).

``resnet-jax train --config configs/FILE.py[:variant] --workdir DIR [--config.a.b=v ...]``
``resnet-jax eval --workdir DIR [--checkpoint latest|best]``
``resnet-jax predict --workdir DIR [--checkpoint best|latest] IMAGE...``
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags(command: str) -> None:
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the config", required=True)
    if command == "train":
        config_flags.DEFINE_config_file(
            "config", None, "recipe file: configs/FILE.py[:variant]", lock_config=True
        )
        flags.mark_flags_as_required(["config"])
    if command == "eval":
        flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "which checkpoint to evaluate")
    if command == "predict":
        flags.DEFINE_enum("checkpoint", "best", ["latest", "best"], "which checkpoint to use")


def run(command: str, argv: list[str]) -> int:
    """Parses ``argv`` for ``command`` and runs it; returns the process exit code."""
    _define_flags(command)
    result = {"code": 0}

    def main(argv_rest):
        logging.set_verbosity(logging.ERROR)  # orbax and tfds are chatty at WARNING
        from resnet_jax.train import distributed

        distributed.maybe_initialize()
        if command in ("train", "eval") and len(argv_rest) > 1:
            raise ValueError(f"unexpected arguments {argv_rest[1:]}; config fields are set as --config.a.b=value")
        if command == "train":
            from resnet_jax.train.loop import train_and_evaluate

            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        elif command == "eval":
            from resnet_jax.train.evaluate import evaluate_workdir

            evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint)
        elif command == "predict":
            from resnet_jax.train.evaluate import predict_images

            if len(argv_rest) < 2:
                raise ValueError("give one or more image files: resnet-jax predict --workdir DIR IMAGE...")
            predict_images(FLAGS.workdir, list(argv_rest[1:]), FLAGS.checkpoint)

    def fail(code: int, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        import jax

        if jax.process_count() > 1:
            # A graceful exit would wait in JAX's shutdown barrier for peers that are
            # themselves waiting for this process (up to 5 minutes). Exit now: the peers
            # stop at their heartbeat timeout, or at once under srun --kill-on-bad-exit.
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)

    def main_with_clean_errors(argv_rest):
        from resnet_jax.train.checkpoint import CheckpointWriteError, IncompatibleCheckpointError

        try:
            main(argv_rest)
        except (FileNotFoundError, IncompatibleCheckpointError, FloatingPointError, ValueError) as e:
            fail(2 if not isinstance(e, FloatingPointError) else 3, f"resnet-jax {command}: error: {e}")
        except OSError as e:  # a checkpoint or log that cannot be written: full disk, permissions
            message = e.strerror if isinstance(e, CheckpointWriteError) else str(e)
            fail(5, f"resnet-jax {command}: write error: {message}")
        except Exception as e:
            # tf.data errors (an unreadable or corrupt record mid-epoch) carry the file name
            # in their message; show that instead of a C++ stack. Checkpoints are untouched.
            if type(e).__module__.startswith("tensorflow"):
                message = getattr(e, "message", str(e)).split("[Op:")[0].split("}}")[-1].strip()
                fail(4, f"resnet-jax {command}: input error: {type(e).__name__}: {message}")
            import jax

            if jax.process_count() > 1:  # the traceback, then the same prompt exit as above
                traceback.print_exc()
                fail(1, f"resnet-jax {command}: process {jax.process_index()} failed: {type(e).__name__}")
            raise

    try:
        app.run(main_with_clean_errors, argv=[f"resnet-jax {command}", *argv])
    except SystemExit as e:
        result["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return result["code"]


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
