"""ResNet-RS (Bello et al. 2021, "Revisiting ResNets"): every published model, and the
paper's scaling strategy for new (depth, resolution) pairs.

Commands:

    resnet-jax train --config configs/resnet_rs.py:rs50-160 --workdir gs://BUCKET/rs50 \
        --config.data.data_dir=gs://BUCKET/tfds
    resnet-jax train --config configs/resnet_rs.py:scaled-152-288 ...   # the scaling rules
    resnet-jax train --config configs/resnet_rs.py:smoke --workdir /tmp/rs   # 2 CPU steps

Published models (values from the official configs, tensorflow/tpu
models/official/resnet/resnet_rs/configs/*.yaml; top-1 from that README, which matches
the paper):

| variant    | dropout | stoch. depth | RandAugment (2 layers) | ImageNet top-1 |
|------------|---------|--------------|------------------------|----------------|
| rs50-160   | 0.25    | 0.0          | 10                     | 78.8           |
| rs101-160  | 0.25    | 0.0          | 10                     | 80.3           |
| rs101-192  | 0.25    | 0.0          | 15                     | 81.2           |
| rs152-192  | 0.25    | 0.0          | 15                     | 82.0           |
| rs152-224  | 0.25    | 0.0          | 15                     | 82.2           |
| rs152-256  | 0.25    | 0.0          | 15                     | 83.0           |
| rs200-256  | 0.25    | 0.1          | 15                     | 83.4           |
| rs270-256  | 0.25    | 0.1          | 15                     | 83.8           |
| rs350-256  | 0.25    | 0.1          | 15                     | 84.0           |
| rs350-320  | 0.4     | 0.1          | 15                     | 84.2           |
| rs420-320  | 0.4     | 0.1          | 15                     | 84.4           |

Shared recipe: 350 epochs, batch 4096, SGD momentum 0.9, lr 0.1 x batch / 256 (1.6)
with 5 linear-warmup epochs and cosine decay, weight decay 4e-5 (not on BatchNorm),
label smoothing 0.1, EMA of weights 0.9999 (used for eval), SE ratio 0.25, ResNet-D
stem and shortcuts, strided-conv stem pool, RandAugment with 2 layers, bfloat16;
eval at the train resolution with a centre crop of size / (size + 32).
Hardware time: the paper trains on TPU v3; 350 epochs of ResNet-RS-50 at 160px are
448M images (not measured here).

The scaling strategy (section 7), as `scaled_values(depth, image_size)` applies it:
1. scale depth (50 -> 420) rather than width in the long (350-epoch) regime where
   overfitting can occur; widths stay those of ResNet;
2. raise the resolution slowly (160 -> 320 across the family, not EfficientNet's 600);
3. regularisation grows with model size: dropout 0.25, 0.4 from 320px; stochastic
   depth 0.1 from depth 200; RandAugment magnitude 10 for models up to ResNet-101 at
   160px, 15 above.
`config_for_budget(gflops)` picks the largest published model whose train-time
multiply-adds per image fit a budget.
"""

import re

from resnet_jax.train.config import base_config, shrink_for_smoke

DEPTHS = (50, 101, 152, 200, 270, 350, 420)
PUBLISHED = ("rs50-160", "rs101-160", "rs101-192", "rs152-192", "rs152-224", "rs152-256",
             "rs200-256", "rs270-256", "rs350-256", "rs350-320", "rs420-320")


def scaled_values(depth: int, image_size: int) -> dict:
    """The regularisation the scaling rules give a ResNet-RS of ``depth`` at ``image_size``."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet-RS depth must be one of {DEPTHS}, got {depth}")
    small = depth * image_size**2 <= 101 * 160**2
    return {
        "dropout_rate": 0.4 if image_size >= 320 else 0.25,
        "drop_path_rate": 0.1 if depth >= 200 else 0.0,
        "randaugment_magnitude": 10.0 if small else 15.0,
    }


def config_for_budget(gflops_per_image: float) -> str:
    """The largest published variant whose forward multiply-adds per image (at its
    resolution) are within ``gflops_per_image``."""
    from resnet_jax.models import create_model, model_macs

    best = None
    for name in PUBLISHED:
        depth, size = map(int, re.fullmatch(r"rs(\d+)-(\d+)", name).groups())
        macs = model_macs(create_model(f"resnetrs{depth}"), size) / 1e9
        if macs <= gflops_per_image and (best is None or macs > best[1]):
            best = (name, macs)
    if best is None:
        raise ValueError(f"no ResNet-RS fits {gflops_per_image} GFLOPs per image (rs50-160 needs ~2.3)")
    return best[0]


def get_config(arg: str | None = "rs50-160"):
    arg = arg or "rs50-160"
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.preprocess = "imagenet"
    c.data.interpolation = "bicubic"
    c.data.batch_size = 4096
    c.data.eval_batch_size = 4096
    c.data.dtype = "bfloat16"
    c.data.randaugment_layers = 2
    c.model.dtype = "bfloat16"
    c.optimizer.base_lr = 0.1
    c.optimizer.scale_lr_with_batch = True
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 4e-5
    c.optimizer.decay_bn_and_bias = False
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5
    c.num_epochs = 350
    c.label_smoothing = 0.1
    c.ema_decay = 0.9999
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    if arg == "smoke":
        depth, size = 50, 32
        shrink_for_smoke(c, image_size=size)
    else:
        match = re.fullmatch(r"(?:rs|scaled-)(\d+)-(\d+)", arg)
        if not match or (arg.startswith("rs") and arg not in PUBLISHED):
            raise ValueError(f"unknown variant {arg!r}; published: {', '.join(PUBLISHED)}; or scaled-DEPTH-SIZE, smoke")
        depth, size = int(match.group(1)), int(match.group(2))
    values = scaled_values(depth, size)
    c.model.name = f"resnetrs{depth}"
    c.model.dropout_rate = values["dropout_rate"]
    c.model.drop_path_rate = values["drop_path_rate"]
    c.data.randaugment_magnitude = values["randaugment_magnitude"]
    c.data.image_size = size
    c.data.crop_fraction = size / (size + 32)
    return c
