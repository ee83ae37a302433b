"""Per-example preprocessing in TensorFlow ops (runs inside tf.data on the host CPU).

Every random op is *stateless* and takes an explicit ``seed`` (a ``[2]`` int tensor)
derived from the run seed and the example's position in the stream, so the same
seed gives the same augmentations, also after a restart.

Images leave here as ``(size, size, C)`` arrays normalised by ``(x / 255 - mean) /
std`` in the configured dtype.

* ImageNet train: fused decode-and-random-crop (Inception crop: area 8%-100%,
  aspect ratio 3/4-4/3, only the crop window is decoded), resize, horizontal flip,
  optional colour jitter (brightness, contrast, saturation).
* ImageNet eval: decode the centre crop of ``crop_fraction`` (0.875 default) of
  the shorter side, resize.
* CIFAR train (the paper): pad 4 pixels, random crop back, horizontal flip.
* plain: resize to the configured size if needed (``digits``, tiny tests).
* RandAugment (``randaugment_layers`` > 0), after the crop, in training only.

Mixup and CutMix act on batches and labels and run on the device inside the train
step (:mod:`resnet_jax.data.mixing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resnet_jax.data.datasets import import_tf

tf = import_tf()

Example = dict[str, Any]
PREPROCESSORS = ("imagenet", "cifar", "plain")


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """``num`` independent stateless seeds from one."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def decode_and_random_crop(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
) -> tf.Tensor:
    """Inception-style random crop, decoding only the crop window of a JPEG.

    Falls back to the full image if no valid crop is found in ``max_attempts``.
    """
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    window = tf.stack([offset_y, offset_x, height, width])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def decode_and_center_crop(image_bytes: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Decodes the centre square of side ``crop_fraction * shorter_side`` (0.875 is the
    classic ImageNet eval: resize 256, crop 224); the caller resizes it to ``size``."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    height, width = shape[0], shape[1]
    side = tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    offset_y = (height - side + 1) // 2
    offset_x = (width - side + 1) // 2
    window = tf.stack([offset_y, offset_x, side, side])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 RGB."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size: int, method: str = "bilinear", antialias: bool = False) -> tf.Tensor:
    """Resizes to ``size`` x ``size`` (float32 output, 0-255 range kept).

    ``antialias`` low-pass filters when shrinking (like PIL); it costs ~40% of the
    ImageNet train path's throughput, and the reference TF/flax ImageNet pipelines
    train without it, so it is off unless ``data.antialias`` is set.
    """
    return tf.image.resize(image, [size, size], method=method, antialias=antialias)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Random brightness, contrast and saturation by up to ``strength`` (0.4 typical),
    on a float image in 0-255."""
    s1, s2, s3 = split_seed(seed, 3)
    image = image / 255.0
    image = tf.image.stateless_random_brightness(image, strength, s1)
    image = tf.image.stateless_random_contrast(image, 1 - strength, 1 + strength, s2)
    if image.shape[-1] == 3:
        image = tf.image.stateless_random_saturation(image, 1 - strength, 1 + strength, s3)
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """The paper's CIFAR augmentation: zero-pad ``pad`` pixels each side, crop back."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(padded, shape, seed)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float], dtype: str) -> tf.Tensor:
    """``(image / 255 - mean) / std`` in ``dtype``; mean and std are in [0, 1] units per channel.

    Computed in float32 as one multiply-add, ``image * scale + offset`` with
    ``scale = 1 / (255 std)`` and ``offset = -mean / std``. Where the image's shape is
    static (after the resize to ``image_size``), both are constants of the image's full
    shape. Broadcast along the last axis of 3 channels, TensorFlow's CPU kernels took
    31% of the ImageNet train path's time for this step; on equal shapes it is within
    the noise of no normalisation at all (README, "Input throughput").
    """
    channels = image.shape[-1]
    scale = np.array([1.0 / (255.0 * s) for s in list(std)[:channels]], np.float32)
    offset = np.array([-m / s for m, s in zip(list(mean)[:channels], list(std)[:channels])], np.float32)
    if image.shape.is_fully_defined():
        scale, offset = (np.broadcast_to(c, image.shape) for c in (scale, offset))
    image = tf.cast(image, tf.float32) * tf.constant(scale) + tf.constant(offset)
    return tf.cast(image, dtype)


def make_preprocess(cfg: Any, info: Any, train: bool) -> Callable[[Example, tf.Tensor], Example]:
    """Returns ``fn(example, seed) -> {"image", "label"}`` for ``cfg.preprocess``.

    ``cfg`` is the ``data`` config (fields: preprocess, image_size, crop_fraction,
    color_jitter, flip, cifar_pad, randaugment_layers, randaugment_magnitude, mean,
    std, dtype, interpolation).
    """
    kind = cfg.preprocess
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {kind!r}; choose one of {PREPROCESSORS}")
    size = int(cfg.image_size)
    method = cfg.get("interpolation", "bilinear")
    antialias = bool(cfg.get("antialias", False))

    def fn(example: Example, seed: tf.Tensor) -> Example:
        crop_seed, flip_seed, jitter_seed = split_seed(seed, 3)
        image = example["image"]
        if kind == "imagenet":
            if not info.encoded:
                raise ValueError(
                    f"preprocess='imagenet' expects JPEG-encoded images; {info.name} stores "
                    "decoded fixed-size images: use preprocess='cifar' or 'plain'"
                )
            if train:
                image = resize(decode_and_random_crop(image, crop_seed), size, method, antialias)
            else:
                image = resize(decode_and_center_crop(image, size, cfg.crop_fraction), size, method, antialias)
        else:
            if info.encoded:
                image = decode_image(image)
            image = tf.cast(image, tf.float32)
            if image.shape[0] != size or image.shape[1] != size:
                image = resize(image, size, method, antialias)
            if train and kind == "cifar":
                image = pad_and_random_crop(image, crop_seed, cfg.cifar_pad)
        if train:
            if cfg.flip:
                image = random_flip(image, flip_seed)
            if cfg.color_jitter:
                image = color_jitter(image, jitter_seed, cfg.color_jitter)
            if cfg.randaugment_layers:
                ra_seed = tf.random.experimental.stateless_fold_in(seed, 7)
                image = randaugment(image, ra_seed, cfg.randaugment_layers, cfg.randaugment_magnitude)
        image = normalize(image, cfg.mean, cfg.std, cfg.dtype)
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    return fn


# ----------------------------------------------------------------------------- RandAugment
# Cubuk et al. 2020, as ResNet-RS trains with it: each of `num_layers` layers picks one
# op uniformly and applies it with probability 0.5 at a fixed `magnitude` on a 0-10
# scale (values above 10, like ResNet-RS's 15, extrapolate linearly). Images are float
# 0-255; geometric ops fill with grey (128).
MAX_LEVEL = 10.0
RANDAUGMENT_OPS = (
    "identity", "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
    "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``a + factor * (b - a)``, clipped to 0-255 (PIL ImageEnhance semantics)."""
    return tf.clip_by_value(a + factor * (b - a), 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
    """Projective transform mapping output (x, y) to input ``matrix @ (x, y, 1)``."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    transforms = tf.reshape(tf.cast(tf.stack(matrix + [0.0, 0.0]), tf.float32), [1, 8])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transforms, output_shape=tf.stack([h, w]),
        interpolation="BILINEAR", fill_mode="CONSTANT", fill_value=128.0,
    )
    return out[0]


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    values = tf.cast(tf.clip_by_value(channel, 0, 255), tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = tf.clip_by_value((tf.cumsum(hist) + step // 2) // tf.maximum(step, 1), 0, 255)
    lut = tf.concat([[0], lut[:-1]], 0)
    return tf.cond(step > 0, lambda: tf.cast(tf.gather(lut, values), tf.float32), lambda: channel)


def _sharpness_blur(image: tf.Tensor) -> tf.Tensor:
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    channels = image.shape[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "SAME")[0]
    # PIL leaves the border pixels unchanged.
    mask = tf.pad(tf.ones(tf.shape(image)[:2] - 2), [[1, 1], [1, 1]])[..., None]
    return mask * blurred + (1 - mask) * image


def apply_randaugment_op(index: tf.Tensor, image: tf.Tensor, magnitude: float, sign: tf.Tensor) -> tf.Tensor:
    """Applies ``RANDAUGMENT_OPS[index]`` at ``magnitude`` (0-10 scale); ``sign`` is +-1."""
    level = magnitude / MAX_LEVEL
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    enhance = 1.0 + sign * 0.9 * level

    def rotate():
        angle = sign * 30.0 * level * 3.141592653589793 / 180.0
        c, s = tf.cos(angle), tf.sin(angle)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        return _transform(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])

    def posterize():
        shift = tf.cast(tf.minimum(4.0 * level, 7.0), tf.int32)
        as_int = tf.cast(image, tf.uint8)
        return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(as_int, tf.cast(shift, tf.uint8)),
                                             tf.cast(shift, tf.uint8)), tf.float32)

    def autocontrast():
        lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
        hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
        scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1e-3)
        return tf.where(hi > lo, scaled, image)

    def equalize():
        return tf.stack([_equalize_channel(image[..., i]) for i in range(image.shape[-1])], -1)

    branches = {
        "identity": lambda: image,
        "autocontrast": autocontrast,
        "equalize": equalize,
        "invert": lambda: 255.0 - image,
        "rotate": rotate,
        "posterize": posterize,
        "solarize": lambda: tf.where(image >= 256.0 - 256.0 * tf.minimum(level, 1.0), 255.0 - image, image),
        "solarize_add": lambda: tf.where(image < 128.0, tf.minimum(image + 110.0 * level, 255.0), image),
        "color": lambda: _blend(_grayscale(image) * tf.ones_like(image), image, enhance),
        "contrast": lambda: _blend(tf.reduce_mean(_grayscale(image)) * tf.ones_like(image), image, enhance),
        "brightness": lambda: _blend(tf.zeros_like(image), image, enhance),
        "sharpness": lambda: _blend(_sharpness_blur(image), image, enhance),
        "shear_x": lambda: _transform(image, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0]),
        "shear_y": lambda: _transform(image, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0]),
        "translate_x": lambda: _transform(image, [1.0, 0.0, sign * 0.45 * level * w, 0.0, 1.0, 0.0]),
        "translate_y": lambda: _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * h]),
    }
    out = tf.switch_case(tf.cast(index, tf.int32), [branches[name] for name in RANDAUGMENT_OPS])
    return tf.ensure_shape(out, image.shape)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float) -> tf.Tensor:
    """RandAugment on a float 0-255 image (any static H, W; 1 or 3 channels).

    A layer that its coin skips computes nothing (``tf.cond``, not a select of a computed
    result): that halves the cost of RandAugment on the host.
    """
    for layer_seed in split_seed(seed, num_layers):
        pick, apply, sign = split_seed(layer_seed, 3)
        index = tf.random.stateless_uniform([], pick, 0, len(RANDAUGMENT_OPS), tf.int32)
        sign_value = tf.where(tf.random.stateless_uniform([], sign) < 0.5, -1.0, 1.0)
        image = tf.cond(
            tf.random.stateless_uniform([], apply) < 0.5,
            lambda image=image, index=index, sign_value=sign_value: apply_randaugment_op(
                index, image, magnitude, sign_value
            ),
            lambda image=image: image,
        )
    return image


def predict_preprocess(image_bytes: bytes, cfg: Any, channels: int) -> tf.Tensor:
    """An image file (JPEG/PNG/GIF/BMP) prepared as evaluation prepares it: decoded to
    ``channels``, centre-cropped to ``crop_fraction`` of the shorter side for the
    ``imagenet`` preprocessing, resized to ``image_size``, normalised."""
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    if cfg.preprocess == "imagenet":
        shape = tf.shape(image)
        side = tf.cast(cfg.crop_fraction * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
        image = tf.image.crop_to_bounding_box(image, (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side)
    image = tf.cast(image, tf.float32)
    if image.shape[0] != cfg.image_size or image.shape[1] != cfg.image_size:
        method = cfg.get("interpolation", "bilinear")
        image = resize(image, int(cfg.image_size), method, bool(cfg.get("antialias", False)))
    return normalize(image, cfg.mean, cfg.std, cfg.dtype)
