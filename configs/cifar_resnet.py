"""CIFAR-10 ResNets of the paper (He et al. 2015, section 4.2) and their plain twins.

Command:

    resnet-jax train --config configs/cifar_resnet.py:resnet56 --workdir workdirs/cifar_r56

(`cifar10` is downloaded by tfds on first use into --config.data.data_dir.)
Variants: resnet20 | resnet32 | resnet44 | resnet56 | resnet110 (option A zero-padding
shortcuts), plain20 ... plain110 (no shortcuts), `smoke` (2 steps on fake 32x32 data).

Recipe (section 4.2): batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided
by 10 at 32k and 48k iterations, stop at 64k (~164 epochs), Kaiming init, no dropout;
training on all 50k images with 4-pixel padding, random 32x32 crops and horizontal
flips; evaluation on the 10k test images. ResNet-110 starts at lr 0.01 until the
training error is below 80% (about 400 iterations), then uses 0.1. Normalisation is
per-channel mean/std (the paper subtracts the per-pixel mean).

Expected test error (paper, Table 6): ResNet-20 8.75%, -32 7.51%, -44 7.17%,
-56 6.97%, -110 6.43% (best of 5 runs; the mean for 110 is 6.61%).
Hardware time (estimate): 64k steps of batch 128 = 8.2M images; ResNet-56 costs
~0.13 GFLOPs per image, so one modern GPU needs minutes of compute, and in practice
the wall time is bounded by step dispatch (a few ms per step) at 10-20 minutes.
"""

from resnet_jax.train.config import base_config, shrink_for_smoke

DEPTHS = (20, 32, 44, 56, 110)


def get_config(arg: str | None = "resnet20"):
    arg = arg or "resnet20"
    c = base_config()
    c.data.name = "cifar10"
    c.data.preprocess = "cifar"
    c.data.image_size = 32
    c.data.cifar_pad = 4
    c.data.flip = True
    c.data.mean = (0.4914, 0.4822, 0.4465)
    c.data.std = (0.2470, 0.2435, 0.2616)
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.shuffle_buffer = 50_000
    c.data.cache_train = True
    c.data.cache_eval = True
    c.optimizer.base_lr = 0.1
    c.optimizer.scale_lr_with_batch = False
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.schedule.name = "multistep"
    c.schedule.boundaries = (32_000, 48_000)
    c.num_train_steps = 64_000
    c.model.zero_init_last = False
    c.log_every_steps = 200
    c.eval_every_epochs = 10
    c.checkpoint_every_steps = 4000
    if arg == "smoke":
        c.model.name = "resnet20"
        return shrink_for_smoke(c, narrow=False)
    depth = arg.removeprefix("resnet").removeprefix("plain")
    if not depth.isdigit() or int(depth) not in DEPTHS or not arg.startswith(("resnet", "plain")):
        raise ValueError(f"unknown variant {arg!r}; use resnet|plain + one of {DEPTHS}, or smoke")
    c.model.name = arg
    if int(depth) == 110:
        c.schedule.initial_lr_factor = 0.1  # lr 0.01 ...
        c.schedule.initial_lr_until_step = 400  # ... until training error < 80%
    return c
