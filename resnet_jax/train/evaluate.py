"""``resnet-jax eval`` and ``resnet-jax predict``: use a workdir's checkpoints.

``evaluate_workdir`` scores the newest or best checkpoint on the full eval split;
``predict_images`` prints the top-5 classes and probabilities of image files.
"""

from __future__ import annotations

from etils import epath

from resnet_jax.train import checkpoint as ckpt_lib
from resnet_jax.train.config import config_from_saved
import jax
import numpy as np

from resnet_jax.train.loop import evaluate, setup
from resnet_jax.train.writers import MetricWriter, log


def _restore_for_use(workdir: str, which: str):
    if not (epath.Path(workdir) / "checkpoints").exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}; train first (resnet-jax train --workdir ...)")
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
    step = (ckpt.best_step() if which == "best" else None) or ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first (resnet-jax train ...)")
    config = config_from_saved(ckpt.saved_config(step))
    s = setup(config)
    state, _ = ckpt.restore(step, ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_sharding))
    ckpt.close()
    return config, s, state, step


def predict_images(workdir: str, paths: list[str], which: str = "best", top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image file, with the eval preprocessing."""
    from resnet_jax.data import preprocess

    for path in paths:
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"image {path} does not exist")
    config, s, state, step = _restore_for_use(workdir, which)
    info = s.pipeline.info
    channels = info.image_shape[-1] if info.image_shape else 3
    names = info.class_names or tuple(str(i) for i in range(info.num_classes))
    images = []
    for path in paths:
        try:
            images.append(preprocess.predict_preprocess(epath.Path(path).read_bytes(), config.data, channels).numpy())
        except Exception as e:  # tf raises InvalidArgumentError for undecodable files
            raise ValueError(f"{path} is not a readable image ({type(e).__name__})") from None
    variables = state.eval_variables(bool(config.ema_decay))
    logits = jax.jit(lambda v, x: s.model.apply(v, x, train=False))(variables, np.stack(images))
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p)[: min(top_k, len(p))]
        results.append([(names[i], float(p[i])) for i in order])
        log(f"{path}: " + ", ".join(f"{names[i]} {100 * p[i]:.1f}%" for i in order))
    log(f"({config.model.name}, {which} checkpoint: step {step})")
    return results


def evaluate_workdir(workdir: str, which: str = "latest") -> dict[str, float]:
    """Restores checkpoint ``which`` (``latest`` or ``best``) of ``workdir`` with the config it
    was trained with, evaluates it on every example of the eval split, prints and returns
    loss / top-1 / top-5 (EMA weights when the run used them)."""
    config, s, state, step = _restore_for_use(workdir, which)
    metrics = evaluate(s, state)
    log(
        f"{config.model.name} step {step} ({which}) on {config.data.name} "
        f"[{s.pipeline.info.eval_split}, {int(metrics['examples'])} examples]: "
        f"loss {metrics['loss']:.4f} | top-1 {100 * metrics['top1']:.2f}% | top-5 {100 * metrics['top5']:.2f}%"
    )
    writer = MetricWriter(workdir)
    writer.write(step, f"eval_{which}", metrics)
    writer.close()
    return metrics
