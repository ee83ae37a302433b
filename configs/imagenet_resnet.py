"""ImageNet ResNets: the paper's original recipe and the modern baseline.

Commands (ImageNet prepared as tfds `imagenet2012`, see README "Preparing ImageNet"):

    # He et al. 2015, as the paper states it: ResNet-50 (v1.5 strides), 90 epochs
    resnet-jax train --config configs/imagenet_resnet.py:resnet50 --workdir gs://BUCKET/r50 \
        --config.data.data_dir=gs://BUCKET/tfds
    # the modern baseline: 100 epochs cosine, label smoothing, bf16, batch 1024
    resnet-jax train --config configs/imagenet_resnet.py:resnet50-modern --workdir ...

Variants (the part before ':' is this file): `resnet18|34|50|101|152|200` with an
optional suffix `_v1` (stride on the first 1x1, the original paper) or `d` (ResNet-D:
`resnet50d`), then `-paper` (default) or `-modern`; and `smoke` (2 steps on fake
data, CI). Change the batch with `--config.data.batch_size=4096`: the learning rate
follows the linear scaling rule.

Recipe `paper` (section 3.4): batch 256, SGD momentum 0.9, weight decay 1e-4 on every
parameter, lr 0.1 divided by 10 every 30 epochs, 90 epochs, Kaiming fan_out init, no
zero-init of the last BatchNorm, random-resized (Inception) crop 224 + horizontal
flip (`--config.data.color_jitter=0.4` adds colour jitter), centre-crop 0.875 eval,
float32.
Recipe `modern` (flax examples/imagenet, Goyal et al. 2017): 100 epochs cosine with 5
warmup epochs, lr 0.1 x batch / 256, Nesterov, label smoothing 0.1, no weight decay on
BatchNorm/bias, zero-init last BatchNorm, bfloat16 compute, batch 1024 (TPU: 1024-4096).

Expected top-1 for ResNet-50: 76.1-76.5% (torchvision's V1 weights, trained with the
paper's recipe: 76.13%; flax examples/imagenet, modern recipe at 100 epochs:
76.3-76.7%). ResNet-18/34/101/152: torchvision V1 69.76 / 73.31 / 77.37 / 78.31%.
Hardware time (an estimate, not yet measured end to end): 90 epochs are 115M images;
at the 5,644 images/s a flax ResNet-50 train step reaches on one H100 (the peer figure
in docs/performance.md) that is about 5.7 h on one H100, provided the host's input
pipeline keeps up, and about 1/8 of that on 8 accelerators.
"""

import re

from resnet_jax.train.config import base_config, shrink_for_smoke

DEPTHS = (18, 34, 50, 101, 152, 200)


def get_config(arg: str | None = "resnet50"):
    arg = arg or "resnet50"
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.preprocess = "imagenet"
    c.data.image_size = 224
    c.data.crop_fraction = 0.875
    c.data.batch_size = 256
    c.data.eval_batch_size = 256
    c.optimizer.base_lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    if arg == "smoke":
        c.model.name = "resnet18"
        return shrink_for_smoke(c)
    match = re.fullmatch(r"resnet(\d+)(_v1|d)?(?:-(paper|modern))?", arg)
    if not match or int(match.group(1)) not in DEPTHS:
        raise ValueError(
            f"unknown variant {arg!r}; use resnet{{{','.join(map(str, DEPTHS))}}}[_v1|d][-paper|-modern] or smoke"
        )
    depth, kind, recipe = int(match.group(1)), match.group(2) or "", match.group(3) or "paper"
    c.model.name = f"resnet{depth}d" if kind == "d" else f"resnet{depth}"
    if kind == "_v1":
        c.model.overrides.stride_on_1x1 = True
    if recipe == "paper":
        c.model.zero_init_last = False
        c.schedule.name = "step"
        c.schedule.step_epochs = 30
        c.num_epochs = 90
        c.optimizer.decay_bn_and_bias = True
    else:
        c.model.dtype = "bfloat16"
        c.data.dtype = "bfloat16"
        c.model.zero_init_last = True
        c.data.batch_size = c.data.eval_batch_size = 1024
        c.schedule.name = "cosine"
        c.schedule.warmup_epochs = 5
        c.num_epochs = 100
        c.optimizer.nesterov = True
        c.optimizer.decay_bn_and_bias = False
        c.label_smoothing = 0.1
    return c
