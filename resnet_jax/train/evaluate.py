"""``resnet-jax eval``: evaluate a workdir's newest or best checkpoint on the full eval split."""

from __future__ import annotations

import ml_collections
from etils import epath

from resnet_jax.train import checkpoint as ckpt_lib
from resnet_jax.train.loop import evaluate, setup
from resnet_jax.train.writers import MetricWriter, log


def evaluate_workdir(workdir: str, which: str = "latest") -> dict[str, float]:
    """Restores checkpoint ``which`` (``latest`` or ``best``) of ``workdir`` with the config it
    was trained with, evaluates it on every example of the eval split, prints and returns
    loss / top-1 / top-5 (EMA weights when the run used them)."""
    if not (epath.Path(workdir) / "checkpoints").exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}; train first (resnet-jax train --workdir ...)")
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first (resnet-jax train ...)")
    config = ml_collections.ConfigDict(ckpt.saved_config(step))
    s = setup(config)
    state, _ = ckpt.restore(step, ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding))
    metrics = evaluate(s, state)
    ckpt.close()
    log(
        f"{config.model.name} step {step} ({which}) on {config.data.name} "
        f"[{s.pipeline.info.eval_split}, {int(metrics['examples'])} examples]: "
        f"loss {metrics['loss']:.4f} | top-1 {100 * metrics['top1']:.2f}% | top-5 {100 * metrics['top5']:.2f}%"
    )
    writer = MetricWriter(workdir)
    writer.write(step, f"eval_{which}", metrics)
    writer.close()
    return metrics
