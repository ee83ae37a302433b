"""``resnet-jax experiment degradation``: the paper's Figure 6 on a dataset of your choice.

Trains plain-20, plain-56, ResNet-20 and ResNet-56 with the same recipe and plots
training error (thin) and test error (bold) per epoch: deeper *plain* networks train
worse (the degradation problem), deeper *residual* ones do not. Writes
``OUT/degradation.png`` and ``OUT/degradation.csv`` (model, epoch, train_error,
test_error), with each run's workdir under ``OUT/runs/``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

MODELS = ("plain20", "plain56", "resnet20", "resnet56")
RECIPES = {"digits": "configs/digits.py", "cifar10": "configs/cifar_resnet.py"}


def _load_recipe(dataset: str, repo_root: str) -> Any:
    from resnet_jax.train.config import load_recipe

    return load_recipe(os.path.join(repo_root, RECIPES[dataset]))


def _curves(workdir: str, steps_per_epoch: int) -> list[dict[str, float]]:
    """Per-epoch train error (mean over the epoch's steps) and test error."""
    train, test = {}, {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            epoch = round(row["step"] / steps_per_epoch, 3)
            if row["split"] == "train":
                train[epoch] = 1.0 - row["top1"]
            elif row["split"] == "eval":
                test[epoch] = 1.0 - row["top1"]
    return [{"epoch": e, "train_error": train[e], "test_error": test.get(e, float("nan"))} for e in sorted(train)]


def run_degradation(
    out_dir: str, dataset: str = "digits", epochs: float | None = None, models: tuple[str, ...] = MODELS,
    repo_root: str | None = None, overrides: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Trains ``models`` on ``dataset`` (``digits`` or ``cifar10``) and writes the figure and CSV."""
    from resnet_jax.train.loop import train_and_evaluate
    from resnet_jax.train.writers import log

    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r} for the degradation experiment; choose {sorted(RECIPES)}")
    repo_root = repo_root or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name in models:
        config = _load_recipe(dataset, repo_root)
        config.model.name = name
        config.model.zero_init_last = False  # plain nets must not start with dead blocks
        if epochs is not None:
            config.num_epochs = epochs
            config.num_train_steps = None
        for key, value in (overrides or {}).items():
            section, _, leaf = key.rpartition(".")
            (config[section] if section else config)[leaf] = value
        from resnet_jax.data.pipeline import create_pipeline

        steps_per_epoch = create_pipeline(config.data, config.seed).steps_per_epoch
        config.log_every_steps = steps_per_epoch
        config.eval_every_epochs = 1
        config.checkpoint_every_steps = 10**9
        log(f"--- degradation experiment: {name} on {dataset} ---")
        workdir = os.path.join(out_dir, "runs", name)
        train_and_evaluate(config, workdir)
        results[name] = _curves(workdir, steps_per_epoch)
    _write_csv(results, os.path.join(out_dir, "degradation.csv"))
    _plot(results, dataset, os.path.join(out_dir, "degradation.png"))
    summary = ", ".join(
        f"{n}: train {100 * r[-1]['train_error']:.1f}% / test {100 * r[-1]['test_error']:.1f}%"
        for n, r in results.items()
    )
    log(f"final errors ({dataset}): {summary}\nwrote {out_dir}/degradation.png and degradation.csv")
    return results


def _write_csv(results: dict[str, list[dict[str, float]]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "epoch", "train_error", "test_error"])
        for name, rows in results.items():
            for r in rows:
                writer.writerow([name, r["epoch"], f"{r['train_error']:.5f}", f"{r['test_error']:.5f}"])


def _plot(results: dict[str, list[dict[str, float]]], dataset: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"20": "tab:orange", "56": "tab:red", "32": "tab:green", "44": "tab:blue", "110": "tab:purple"}
    for ax, family, title in ((axes[0], "plain", "plain networks"), (axes[1], "resnet", "residual networks")):
        for name, rows in results.items():
            if not name.startswith(family):
                continue
            depth = name.removeprefix(family)
            epochs = [r["epoch"] for r in rows]
            color = colors.get(depth, None)
            ax.plot(epochs, [100 * r["train_error"] for r in rows], "--", lw=1, color=color,
                    label=f"{name} train")
            ax.plot(epochs, [100 * r["test_error"] for r in rows], "-", lw=2.2, color=color,
                    label=f"{name} test")
        ax.set_title(f"{title} on {dataset}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(bottom=0)
    fig.suptitle("Degradation (He et al. 2015, Fig. 6): dashed = training error, bold = test error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
