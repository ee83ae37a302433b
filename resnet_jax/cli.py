"""The ``resnet-jax`` command: parse flags and dispatch to the library; no logic of its own.

Subcommands:
  models      table of registered models (params, GFLOPs, input size)
  train       train a config (ml_collections flags: --config FILE.py[:variant] --config.x=y)
  eval        evaluate a workdir's newest or best checkpoint on the full eval split
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _models(args: argparse.Namespace) -> int:
    from resnet_jax.models import create_model, get_spec, list_models, model_macs, model_params

    names = list_models(args.filter)
    if not names:
        print(f"no registered model matches {args.filter!r}", file=sys.stderr)
        return 1
    header = f"{'model':<20} {'params (M)':>11} {'GFLOPs':>8} {'input':>6} {'classes':>7}  description"
    print(header)
    print("-" * len(header))
    for name in names:
        spec = get_spec(name)
        model = create_model(name)
        params = model_params(model)
        macs = model_macs(model, spec.input_size) if not args.no_flops else float("nan")
        print(
            f"{name:<20} {params / 1e6:>11.2f} {macs / 1e9:>8.2f} {spec.input_size:>6} "
            f"{spec.num_classes:>7}  {spec.description}"
        )
    print(f"\n{len(names)} models. GFLOPs are multiply-adds of one image at its input size.")
    return 0


def _absl_command(command: str, argv: Sequence[str]) -> int:
    """Runs a config-driven command (train / eval) under absl flag parsing."""
    from resnet_jax import main_flags

    return main_flags.run(command, list(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-jax",
        description="The ResNet family in JAX/Flax: models, training, recipes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registered models with params and GFLOPs")
    p.add_argument("--filter", default=None, help="shell-style pattern, e.g. 'resnetrs*'")
    p.add_argument("--no-flops", action="store_true", help="skip the GFLOPs column (faster)")
    p.set_defaults(func=_models)
    for name, text in (
        ("train", "train a config: --config configs/FILE.py[:variant] --workdir DIR [--config.k=v]"),
        ("eval", "evaluate a workdir's checkpoint on the full eval split"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):
        return _absl_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
