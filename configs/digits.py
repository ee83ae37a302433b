"""The default recipe: CIFAR ResNet-20 on the embedded `digits` dataset, on a CPU.

Command (the README's main job; no download, a few minutes on a 2-core CPU):

    resnet-jax train --config configs/digits.py --workdir workdirs/digits

Expected: >= 97% test top-1 on the 359 held-out digits (measured: see README).
Variants: `configs/digits.py:smoke` trains 2 steps (CI), `:plain20` the plain net.

Data: the 1,797 8x8 scikit-learn digits (train 1,438 / test 359, see
resnet_jax/data/datasets.py), random 1-pixel shifts, no flips (digits are not
mirror-symmetric). Optimiser: SGD + Nesterov momentum 0.9, lr 0.1 at batch 128
with 2 warmup epochs and cosine decay over 30 epochs, weight decay 5e-4.
"""

from resnet_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.model.name = "resnet20"
    c.data.name = "digits"
    c.data.preprocess = "cifar"  # pad + random crop, here by 1 pixel
    c.data.cifar_pad = 1
    c.data.flip = False
    c.data.image_size = 8
    c.data.mean = (0.3,)
    c.data.std = (0.4,)
    c.data.batch_size = 128
    c.data.eval_batch_size = 128
    c.data.cache_train = True
    c.data.cache_eval = True
    c.optimizer.base_lr = 0.1
    c.optimizer.scale_lr_with_batch = False
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 2
    c.num_epochs = 30
    c.log_every_steps = 22
    c.eval_every_epochs = 10
    c.checkpoint_every_steps = 110
    if arg == "smoke":
        c.num_train_steps = 2
        c.log_every_steps = 1
        c.data.batch_size = 16
        c.data.eval_batch_size = 64
    elif arg == "plain20":
        c.model.name = "plain20"
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; choose smoke or plain20")
    return c
