"""Preprocessing ops against closed-form numpy references."""


import numpy as np
import pytest

from resnet_jax.data import preprocess
from resnet_jax.data.datasets import DatasetInfo
from resnet_jax.train.config import base_config

tf = preprocess.tf


def _png(array):
    return tf.io.encode_png(tf.constant(array)).numpy()


def _jpeg(array, quality=100):
    return tf.io.encode_jpeg(tf.constant(array), quality=quality).numpy()


def _gradient_image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def test_center_crop_decodes_the_central_square():
    image = _gradient_image(100, 200)
    out = preprocess.decode_and_center_crop(tf.constant(_jpeg(image)), 40, 0.5).numpy()
    assert out.shape == (50, 50, 3)  # half of the shorter side
    ref = image[25:75, 75:125]
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3  # JPEG q100 noise only


def test_inception_crop_area_and_aspect_ratio_ranges():
    image_bytes = tf.constant(_jpeg(_gradient_image(300, 400), 90))
    areas, ratios = [], []
    for i in range(40):
        crop = preprocess.decode_and_random_crop(image_bytes, tf.constant([0, i], tf.int64)).numpy()
        areas.append(crop.shape[0] * crop.shape[1] / (300 * 400))
        ratios.append(crop.shape[1] / crop.shape[0])
    assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.05 and max(ratios) <= 4 / 3 + 0.05
    assert len({round(a, 3) for a in areas}) > 20  # crops vary with the seed
    same = preprocess.decode_and_random_crop(image_bytes, tf.constant([0, 5], tf.int64)).numpy()
    again = preprocess.decode_and_random_crop(image_bytes, tf.constant([0, 5], tf.int64)).numpy()
    np.testing.assert_array_equal(same, again)


def test_pad_and_random_crop_is_a_zero_filled_translation():
    image = np.arange(1, 8 * 8 + 1, dtype=np.float32).reshape(8, 8, 1)
    shifts = set()
    for i in range(30):
        out = preprocess.pad_and_random_crop(tf.constant(image), tf.constant([1, i], tf.int64), pad=2).numpy()
        padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
        match = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out)]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 5


def test_normalize_closed_form():
    image = np.full((2, 2, 3), 128, np.uint8)
    out = preprocess.normalize(tf.constant(image), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "float32").numpy()
    v = 128 / 255
    np.testing.assert_allclose(out[0, 0], [(v - 0.5) / 0.5, (v - 0.25) / 0.25, v], rtol=1e-6, atol=1e-6)
    assert preprocess.normalize(tf.constant(image), (0.5,) * 3, (0.5,) * 3, "bfloat16").dtype == tf.bfloat16


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_equals_the_closed_form_with_static_and_unknown_shapes(channels):
    """The full-shape constants (static shape) and the broadcast (shape unknown when
    traced) both give ``(x / 255 - mean) / std`` per channel, in float64 here."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = np.random.default_rng(0).integers(0, 256, (5, 7, channels)).astype(np.float32)
    expected = (image.astype(np.float64) / 255 - np.array(mean[:channels])) / np.array(std[:channels])
    static = preprocess.normalize(tf.constant(image), mean, std, "float32")
    unknown = tf.function(
        lambda x: preprocess.normalize(x, mean, std, "float32"),
        input_signature=[tf.TensorSpec([None, None, channels], tf.float32)],
    )(tf.constant(image))
    for out in (static, unknown):
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_imagenet_train_and_eval_transforms_give_the_configured_size():
    cfg = base_config().data
    cfg.image_size = 32
    cfg.color_jitter = 0.4
    info = DatasetInfo("x", 10, "train", "validation", 1, 1, None, None, encoded=True)
    example = {"image": tf.constant(_jpeg(_gradient_image(60, 80))), "label": tf.constant(3, tf.int64)}
    for train in (True, False):
        out = preprocess.make_preprocess(cfg, info, train)(example, tf.constant([0, 1], tf.int64))
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32
        assert int(out["label"]) == 3
    # Eval is deterministic: no seed dependence.
    fn = preprocess.make_preprocess(cfg, info, False)
    a = fn(example, tf.constant([0, 1], tf.int64))["image"].numpy()
    b = fn(example, tf.constant([9, 9], tf.int64))["image"].numpy()
    np.testing.assert_array_equal(a, b)


def test_flip_mirrors_the_image():
    image = _gradient_image(4, 6).astype(np.float32)
    outs = [preprocess.random_flip(tf.constant(image), tf.constant([0, i], tf.int64)).numpy() for i in range(20)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    kept = [np.array_equal(o, image) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_unknown_preprocess_is_an_error():
    cfg = base_config().data
    cfg.preprocess = "fancy"
    with pytest.raises(ValueError, match="unknown preprocess 'fancy'"):
        preprocess.make_preprocess(cfg, None, True)


def _op(name, image, magnitude=10.0, sign=1.0):
    index = preprocess.RANDAUGMENT_OPS.index(name)
    return preprocess.apply_randaugment_op(tf.constant(index), tf.constant(image), magnitude, tf.constant(sign)).numpy()


def test_randaugment_ops_against_closed_forms():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_op("identity", image), image)
    np.testing.assert_array_equal(_op("invert", image), 255 - image)
    # Solarize at magnitude 5: invert pixels >= 128.
    np.testing.assert_array_equal(_op("solarize", image, 5.0), np.where(image >= 128, 255 - image, image))
    # Posterize at magnitude 5: drop the 2 low bits.
    np.testing.assert_array_equal(_op("posterize", image, 5.0), (image.astype(np.uint8) >> 2 << 2).astype(np.float32))
    # Brightness: blend with black by factor 1 + 0.9 * level.
    np.testing.assert_allclose(_op("brightness", image, 5.0, -1.0), np.clip(image * 0.55, 0, 255), rtol=1e-6)
    # Autocontrast stretches each channel to 0..255.
    out = _op("autocontrast", image * 0.5 + 20)
    np.testing.assert_allclose(out.min(axis=(0, 1)), 0, atol=1e-3)
    np.testing.assert_allclose(out.max(axis=(0, 1)), 255, atol=1e-3)
    # Translate by 0.45 * width * level: columns move right, grey fill on the left.
    out = _op("translate_x", image, 10.0 / 0.45 * 4 / 16, -1.0)  # 4 pixels
    np.testing.assert_allclose(out[:, 4:], image[:, :-4], atol=1e-3)
    np.testing.assert_allclose(out[:, :4], 128.0)
    # Rotation by 0 (magnitude 0) and shear by 0 are identities.
    np.testing.assert_allclose(_op("rotate", image, 0.0), image, atol=1e-3)
    np.testing.assert_allclose(_op("shear_x", image, 0.0), image, atol=1e-3)


def test_equalize_matches_pil():
    from PIL import Image, ImageOps

    rng = np.random.default_rng(1)
    image = (rng.beta(2, 5, (20, 24, 3)) * 255).astype(np.uint8)
    ref = np.asarray(ImageOps.equalize(Image.fromarray(image)), np.float32)
    np.testing.assert_array_equal(_op("equalize", image.astype(np.float32)), ref)


def test_randaugment_equals_its_literal_definition():
    """Each layer draws an op, a sign and a coin, and keeps the op's result when the coin
    is < 0.5. Written here as a select of an always-computed result; the implementation
    skips the op instead (tf.cond) and must give the same image for every seed."""

    def literal(image, seed, num_layers, magnitude):
        for layer_seed in preprocess.split_seed(seed, num_layers):
            pick, apply, sign = preprocess.split_seed(layer_seed, 3)
            index = tf.random.stateless_uniform([], pick, 0, len(preprocess.RANDAUGMENT_OPS), tf.int32)
            sign_value = tf.where(tf.random.stateless_uniform([], sign) < 0.5, -1.0, 1.0)
            augmented = preprocess.apply_randaugment_op(index, image, magnitude, sign_value)
            image = tf.where(tf.random.stateless_uniform([], apply) < 0.5, augmented, image)
        return image

    image = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.float32))
    for i in range(60):
        seed = tf.constant([5, i], tf.int64)
        np.testing.assert_array_equal(
            preprocess.randaugment(image, seed, 2, 15.0).numpy(), literal(image, seed, 2, 15.0).numpy()
        )


def test_randaugment_is_seeded_and_changes_images():
    image = tf.constant(_gradient_image(16, 16).astype(np.float32))
    outs = [preprocess.randaugment(image, tf.constant([3, i], tf.int64), 2, 15.0).numpy() for i in range(40)]
    again = preprocess.randaugment(image, tf.constant([3, 0], tf.int64), 2, 15.0).numpy()
    np.testing.assert_array_equal(outs[0], again)
    assert sum(not np.array_equal(o, image.numpy()) for o in outs) >= 20
    assert all(o.shape == (16, 16, 3) and o.min() >= 0 and o.max() <= 255 for o in outs)
