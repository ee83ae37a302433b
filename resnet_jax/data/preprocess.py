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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def resize(image: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
    """Resizes to ``size`` x ``size`` (float32 output, 0-255 range kept)."""
    return tf.image.resize(image, [size, size], method=method, antialias=method != "nearest")


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
    """``(image / 255 - mean) / std``; mean and std are in [0, 1] units per channel."""
    channels = image.shape[-1]
    mean = tf.constant(list(mean)[:channels], tf.float32)
    std = tf.constant(list(std)[:channels], tf.float32)
    image = (tf.cast(image, tf.float32) / 255.0 - mean) / std
    return tf.cast(image, dtype)


def make_preprocess(cfg: Any, info: Any, train: bool) -> Callable[[Example, tf.Tensor], Example]:
    """Returns ``fn(example, seed) -> {"image", "label"}`` for ``cfg.preprocess``.

    ``cfg`` is the ``data`` config (fields: preprocess, image_size, crop_fraction,
    color_jitter, flip, cifar_pad, mean, std, dtype, interpolation).
    """
    kind = cfg.preprocess
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {kind!r}; choose one of {PREPROCESSORS}")
    size = int(cfg.image_size)
    method = cfg.get("interpolation", "bilinear")

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
                image = resize(decode_and_random_crop(image, crop_seed), size, method)
            else:
                image = resize(decode_and_center_crop(image, size, cfg.crop_fraction), size, method)
        else:
            if info.encoded:
                image = decode_image(image)
            image = tf.cast(image, tf.float32)
            if image.shape[0] != size or image.shape[1] != size:
                image = resize(image, size, method)
            if train and kind == "cifar":
                image = pad_and_random_crop(image, crop_seed, cfg.cifar_pad)
        if train:
            if cfg.flip:
                image = random_flip(image, flip_seed)
            if cfg.color_jitter:
                image = color_jitter(image, jitter_seed, cfg.color_jitter)
        image = normalize(image, cfg.mean, cfg.std, cfg.dtype)
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    return fn
