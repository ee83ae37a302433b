"""The ``resnet-jax`` command: parse flags and dispatch to the library; no logic of its own.

Subcommands:
  models      table of registered models (params, GFLOPs, input size)
  train       train a config (ml_collections flags: --config FILE.py[:variant] --config.x=y)
  eval        evaluate a workdir's newest or best checkpoint on the full eval split
  predict     top-5 class names and probabilities of image files
  convert     import torchvision / timm weights into an Orbax checkpoint
  benchmark   images/s, MFU and memory of the train step (synthetic data on device)
  bench-input images/s of the input pipeline on this host (no accelerator)
  experiment  reproduce a paper experiment (degradation: plain vs residual, Fig. 6)
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


def _convert(args: argparse.Namespace) -> int:
    from resnet_jax.models import convert

    if args.model not in convert.SOURCES[args.source]:
        print(
            f"resnet-jax convert: error: {args.model} is not a {args.source} model; "
            f"{args.source} has: {', '.join(convert.SOURCES[args.source])}",
            file=sys.stderr,
        )
        return 2
    try:
        state_dict = convert.read_weights(args.weights)
        print(f"read {len(state_dict)} tensors from {args.weights}", flush=True)
        classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 0
        variables = convert.convert_state_dict(state_dict, args.model, num_classes=classes)
        convert.save_converted(variables, args.out, args.model, args.source)
    except (convert.ConversionError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"resnet-jax convert: error: {e}", file=sys.stderr)
        return 2
    meta = convert.preprocessing_metadata(args.model)
    print(
        f"wrote {args.out}: {args.model} ({classes} classes) from {args.source}; evaluate at "
        f"{meta['test_input_size']}px, crop {meta['crop_pct']}, {meta['interpolation']}, "
        f"mean {meta['mean']}, std {meta['std']}\n"
        f"load with: resnet_jax.load_pretrained({args.model!r}, {args.out!r})"
    )
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from resnet_jax.train.experiments import run_degradation

    run_degradation(args.out, dataset=args.dataset, epochs=args.epochs, repo_root=args.repo_root)
    return 0


def _bench_input(args: argparse.Namespace) -> int:
    from resnet_jax.data import bench_input

    return bench_input.main(args)


def _benchmark(args: argparse.Namespace) -> int:
    from resnet_jax.train import benchmark

    return benchmark.main(args)


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
    p = sub.add_parser("convert", help="import torchvision/timm weights as an Orbax checkpoint")
    p.add_argument("--model", required=True, help="registry name, e.g. resnet50")
    p.add_argument("--source", required=True, choices=["torchvision", "timm"])
    p.add_argument("--weights", required=True, help=".safetensors or .pth/.pt state_dict file")
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.set_defaults(func=_convert)
    p = sub.add_parser("experiment", help="reproduce a paper experiment")
    p.add_argument("name", choices=["degradation"], help="degradation: plain vs residual nets (Fig. 6)")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--epochs", type=float, default=None, help="default: the recipe's length")
    p.add_argument("--out", default="workdirs/degradation", help="output directory")
    p.add_argument("--repo-root", default=".", help="where configs/ lives")
    p.set_defaults(func=_experiment)
    p = sub.add_parser("bench-input", help="images/s of the ImageNet preprocessing on this host")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--threads", default="1,2", help="comma-separated tf.data thread counts to measure")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--randaugment-layers", type=int, default=0,
                   help="RandAugment layers on the train path (ResNet-RS: 2); 0: none")
    p.add_argument("--randaugment-magnitude", type=float, default=10.0, help="RandAugment magnitude, 0-10 scale")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(func=_bench_input)
    p = sub.add_parser("benchmark", help="time the trainer's train step on synthetic on-device data")
    p.add_argument("--config", default=None, metavar="FILE.py[:variant]",
                   help="time this recipe's step: its EMA, label smoothing, weight decay, BatchNorm groups and "
                        "model options, on synthetic data; its model, image size and dtype unless given below")
    p.add_argument("--model", default=None, help="a registered model (resnet-jax models); default: the recipe's, "
                                                 "else resnet50")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="global batch; default 256")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="square input side in pixels; default: the recipe's, else 224")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="compute dtype (parameters stay float32); default: the recipe's, else bfloat16")
    p.add_argument("--steps", type=_positive_int, default=50, help="timed steps (split into 5 windows); default 50")
    p.add_argument("--steps-per-dispatch", type=_positive_int, default=1, metavar="K",
                   help="run K train steps per call (jax.lax.scan), one host dispatch for K steps")
    p.add_argument("--find-max-batch", action="store_true",
                   help="also search the largest batch whose step fits the device's memory (GPU or TPU; "
                        "to within 1/16: probes where --batch-size's compiled memory extrapolates to the limit, "
                        "then bisects; progress on stderr)")
    p.add_argument("--with-input", action="store_true",
                   help="feed the step from the real tf.data pipeline: the recipe's dataset and preprocessing, "
                        "else imagenet2012's (needs TensorFlow)")
    p.add_argument("--dataset", default=None,
                   help="with --with-input: dataset name; default: the recipe's, else imagenet2012")
    p.add_argument("--data-dir", default=None, help="with --with-input: tfds data_dir; default: the recipe's")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a jax.profiler trace of one timed window to DIR (TensorBoard/Perfetto) and the "
                        "compiled HLO beside it, for benchmarks/kernel_bandwidth.py")
    p.set_defaults(func=_benchmark)
    for name, text in (
        ("train", "train a config: --config configs/FILE.py[:variant] --workdir DIR [--config.k=v]"),
        ("eval", "evaluate a workdir's checkpoint on the full eval split"),
        ("predict", "top-5 classes of image files: --workdir DIR IMAGE..."),
    ):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "predict"):
        return _absl_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
