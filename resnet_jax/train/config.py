"""The full set of training options with their defaults; recipes in ``configs/`` start here.

Every field can be overridden from the command line (``--config.optimizer.base_lr=0.2``).
A recipe calls :func:`base_config` and changes what it needs.
"""

from __future__ import annotations

import os

import ml_collections

Placeholder = ml_collections.config_dict.placeholder


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field the trainer reads (a ResNet-50 ImageNet-style run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, data order, augmentation and dropout all derive from it

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet50"  # a registry name: `resnet-jax models`
    c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU; params stay float32
    c.model.num_classes = Placeholder(int)  # None: the dataset's number of classes
    c.model.drop_path_rate = 0.0  # stochastic depth of the last block (linear in depth)
    c.model.dropout_rate = 0.0  # dropout before the classifier
    c.model.bn_momentum = 0.9  # flax convention (PyTorch 0.1)
    c.model.bn_epsilon = 1e-5
    c.model.bn_group_size = Placeholder(int)  # ghost-BN examples per group; None: global batch
    c.model.zero_init_last = Placeholder(bool)  # None: the registry's default
    c.model.overrides = ml_collections.ConfigDict()  # any other ResNet argument, e.g. se_ratio

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"  # tfds name, `digits`, `fake` or `image_folder:PATH`
    c.data.data_dir = Placeholder(str)  # local path or gs:// bucket; None: tfds default
    c.data.download = True  # let tfds download catalog datasets that are not prepared
    c.data.strict_images = False  # image_folder: fail on an unreadable file instead of skipping it
    c.data.train_split = Placeholder(str)  # None: "train"
    c.data.eval_split = Placeholder(str)  # None: validation, else test
    c.data.preprocess = "imagenet"  # imagenet | cifar | plain
    c.data.image_size = 224  # train and eval resolution
    c.data.crop_fraction = 0.875  # eval centre crop of the shorter side (imagenet)
    c.data.interpolation = "bilinear"
    c.data.antialias = False  # low-pass when shrinking (PIL-like); ~40% slower input
    c.data.flip = True  # random horizontal flip in training
    c.data.color_jitter = 0.0  # brightness/contrast/saturation strength, 0: off
    c.data.cifar_pad = 4  # pad-and-crop pixels (cifar)
    c.data.randaugment_layers = 0  # RandAugment ops per image, 0: off (ResNet-RS: 2)
    c.data.randaugment_magnitude = 10.0  # 0-10 scale (ResNet-RS: 10 or 15)
    c.data.mixup_alpha = 0.0  # Beta(alpha, alpha) mixup of batch pairs, 0: off
    c.data.cutmix_alpha = 0.0  # CutMix; with both on, one of the two per batch
    c.data.mean = (0.485, 0.456, 0.406)  # of [0, 1] RGB
    c.data.std = (0.229, 0.224, 0.225)
    c.data.dtype = "float32"  # dtype of the images handed to the model
    c.data.batch_size = 256  # global train batch (all processes)
    c.data.eval_batch_size = 256  # global eval batch; the last one is padded and masked
    c.data.shuffle_buffer = 16_384  # whole-split shuffle when the share fits
    c.data.cache_train = False  # cache decoded records in memory (small datasets)
    c.data.cache_eval = False
    c.data.threads = 0  # tf.data private threadpool size, 0: default
    c.data.prefetch = 2  # batches in flight on the devices
    c.data.num_classes = 1000  # fake only
    c.data.fake_train_size = 1_281_167  # fake only: examples per "epoch"
    c.data.fake_eval_size = 50_000  # fake only
    c.data.fake_pool_batches = 4  # fake only: distinct batches cycled

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | lars
    c.optimizer.base_lr = 0.1  # at batch 256 when scale_lr_with_batch, else absolute
    c.optimizer.scale_lr_with_batch = True  # lr = base_lr * batch_size / 256 (Goyal et al.)
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mode = "l2"  # l2 (gradient of wd/2 ||w||^2, the paper) | decoupled
    c.optimizer.decay_bn_and_bias = True  # False: exclude BatchNorm and bias parameters
    c.optimizer.grad_clip_norm = Placeholder(float)  # global-norm clipping, None: off

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "step"  # step | multistep | cosine | constant
    c.schedule.warmup_epochs = 0.0  # linear warmup from 0 (cosine, step, constant)
    c.schedule.step_epochs = 30  # step: multiply by decay_factor every N epochs
    c.schedule.boundaries = ()  # multistep: steps at which to multiply by decay_factor
    c.schedule.decay_factor = 0.1
    c.schedule.initial_lr_factor = 1.0  # multistep: lr factor before initial_lr_until_step
    c.schedule.initial_lr_until_step = 0  # (ResNet-110: 0.1 until ~400 iterations)

    c.num_epochs = 90.0  # training length; num_train_steps wins when set
    c.num_train_steps = Placeholder(int)
    c.label_smoothing = 0.0
    c.ema_decay = 0.0  # EMA of params and BatchNorm stats, used for eval; 0: off

    c.log_every_steps = 100
    c.eval_every_epochs = 1.0  # also at the end
    c.checkpoint_every_steps = 1000  # also at the end and on SIGTERM
    c.keep_checkpoints = 3  # the newest K; the best by eval top-1 is kept apart
    c.async_checkpoints = True
    c.compilation_cache_dir = "~/.cache/resnet_jax/xla"  # "" disables the persistent cache
    c.shard_params = False  # FSDP-style: shard params and optimizer state on the data axis
    c.stop_after_steps = Placeholder(int)  # stop early (tests, preemption drills); resumable
    return c


def load_recipe(spec: str) -> ml_collections.ConfigDict:
    """The config of a recipe file, ``"configs/FILE.py[:variant]"``, exactly as ``resnet-jax
    train --config`` reads it (``ml_collections.config_flags``' parser: ``get_config(variant)``,
    or ``get_config()`` without a variant), for commands that take a recipe outside absl flag
    parsing (``resnet-jax benchmark --config``, the experiments). Unlocked: callers may edit it.
    """
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no recipe file {path!r} (from {spec!r}); give configs/FILE.py[:variant]")
    try:
        return ConfigFileFlagParser(name="recipe", lock_config=False).parse(spec)
    except AttributeError as e:
        if e.name != "get_config":
            raise
        raise ValueError(f"recipe file {path!r} defines no get_config()") from None


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A config from a checkpoint's saved dict, on top of today's defaults, so fields
    added since the checkpoint was written take their default values."""
    config = base_config()

    def merge(target: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and key in target and isinstance(target[key], ml_collections.ConfigDict):
                merge(target[key], value)
                continue
            if isinstance(value, list):
                value = tuple(value)
            with target.unlocked():
                target[key] = value

    merge(config, saved)
    return config


def shrink_for_smoke(c: ml_collections.ConfigDict, image_size: int = 32, narrow: bool = True) -> ml_collections.ConfigDict:
    """Turns a recipe into its CPU ``smoke`` variant in place: `fake` data of
    ``image_size`` with 10 classes, batch 8, 2 steps; ``narrow`` shrinks stage widths to 8."""
    if narrow:
        c.model.overrides.widths = (8, 8, 8, 8)
        c.model.overrides.stem_width = 8
    c.data.name = "fake"
    c.data.preprocess = "plain"
    c.data.image_size = image_size
    c.data.num_classes = 10
    c.data.batch_size = c.data.eval_batch_size = 8
    c.data.fake_train_size = 32
    c.data.fake_eval_size = 12
    c.num_train_steps = 2
    c.log_every_steps = 1
    return c
