"""Datasets by name: tfds catalog datasets, image folders, the embedded ``digits``, and ``fake``.

``dataset_info(name, data_dir)`` answers what the trainer needs before any data
flows (classes, split sizes, image shape) and ``get_builder`` returns the prepared
tfds builder. Names:

* any tfds catalog name (``imagenet2012``, ``imagenette``, ``cifar10``, ``cifar100``,
  ...), with ``data_dir`` a local path or ``gs://`` bucket; splits, keys and the
  number of classes come from the builder's info;
* ``digits``: the 1,797 8x8 handwritten digits that ship inside scikit-learn,
  prepared as a tfds dataset with no download. Split: example ``i`` (in
  scikit-learn's order) is in ``test`` when ``i % 5 == 4`` (359 images), otherwise
  in ``train`` (1,438 images);
* ``image_folder:PATH``: ``PATH/<split>/<class>/*.{jpg,jpeg,png}`` with a ``train``
  and a ``val`` (or ``validation``/``test``) folder, prepared once into tfds format
  under ``data_dir``;
* ``fake``: synthetic images generated on the fly (no TensorFlow; see
  :mod:`resnet_jax.data.pipeline`).

Only this module and :mod:`~resnet_jax.data.preprocess` /
:mod:`~resnet_jax.data.pipeline` import TensorFlow, and only when a tfds dataset is
used; :func:`import_tf` hides accelerators from TensorFlow before it initialises.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

FAKE = "fake"
DIGITS = "digits"
IMAGE_FOLDER_PREFIX = "image_folder:"
# Catalog datasets the recipes are tested against; any other tfds name also works.
KNOWN_DATASETS = (DIGITS, FAKE, "imagenet2012", "imagenette", "cifar10", "cifar100", "image_folder:PATH")
EVAL_SPLIT_PREFERENCE = ("validation", "test", "val")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before reading it.

    Attributes:
      name: dataset name as configured.
      num_classes: number of labels.
      train_split / eval_split: tfds split names.
      num_train / num_eval: examples in those splits.
      image_shape: (H, W, C) of stored images, None where images vary in size.
      class_names: label names, index-aligned, where the dataset has them.
      encoded: images are stored encoded (JPEG/PNG) and decoded by the pipeline
        (lets ImageNet preprocessing decode only the crop window).
    """

    name: str
    num_classes: int
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    image_shape: tuple[int, int, int] | None
    class_names: tuple[str, ...] | None = None
    encoded: bool = False


def import_tf():
    """Imports TensorFlow for tf.data only, hiding every GPU/TPU from it first."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "TensorFlow is needed for tfds datasets (pip install tensorflow-cpu); the "
            "`fake` dataset, the models and the train step run without it"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # already initialised without accelerators, or no such device type
    return tf


@functools.cache
def _digits_builder_class():
    import_tf()
    import numpy as np
    import tensorflow_datasets as tfds

    class Digits(tfds.core.GeneratorBasedBuilder):
        """The UCI/scikit-learn 8x8 handwritten digits (1,797 images, 10 classes).

        Images are 8x8x1 uint8: scikit-learn's 0-16 intensities scaled by 255/16.
        ``test`` holds the images whose index is 4 mod 5 (359), ``train`` the rest.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}

        def _info(self):
            return self.dataset_info_from_configs(
                description="8x8 handwritten digits shipped with scikit-learn (no download).",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                    }
                ),
                supervised_keys=("image", "label"),
                homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(False), "test": self._generate_examples(True)}

        def _generate_examples(self, test):
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
            for i, (image, label) in enumerate(zip(images, digits.target)):
                if (i % 5 == 4) == test:
                    yield i, {"image": image, "label": int(label)}

    return Digits


def default_data_dir(data_dir: str | None) -> str:
    """``data_dir`` or tfds' default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    if data_dir:
        return data_dir
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


T = TypeVar("T")


def _prepare_in_process_order(prepare: Callable[[], T]) -> T:
    """Runs ``prepare`` in process 0, then, after a barrier, in the other processes.

    ``prepare`` must build the builder itself: one made before the barrier would keep
    the unprepared dataset's (empty) info.

    With a data_dir that all hosts share, concurrent preparation races on tfds'
    final rename ("Destination ... already exists"); this way the others find the
    dataset prepared. With per-host data dirs each host still prepares its own.
    """
    import jax

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("resnet_jax: dataset prepared by process 0")
    return result if jax.process_index() == 0 else prepare()


def get_builder(
    name: str, data_dir: str | None = None, download: bool = True, strict_images: bool = False
) -> Any:
    """The prepared tfds builder for ``name``.

    ``digits`` and image folders are prepared on first use (no network). Catalog
    datasets are downloaded and prepared when ``download`` is true and they are not
    already in ``data_dir``; ``imagenet2012`` needs its manual download (the error
    says where to put it).
    """
    if name == FAKE:
        raise ValueError("the `fake` dataset has no tfds builder; use the pipeline directly")
    import_tf()
    data_dir = default_data_dir(data_dir)
    if name == DIGITS:

        def open_builder():
            builder = _digits_builder_class()(data_dir=data_dir)
            builder.download_and_prepare()
            return builder

    elif name.startswith(IMAGE_FOLDER_PREFIX):
        from resnet_jax.data.image_folder import prepare_image_folder

        def open_builder():
            return prepare_image_folder(name[len(IMAGE_FOLDER_PREFIX) :], data_dir, strict=strict_images)

    else:

        def open_builder():
            return _catalog_builder(name, data_dir, download)

    return _prepare_in_process_order(open_builder)


def _catalog_builder(name: str, data_dir: str, download: bool) -> Any:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)} or any tfds "
            "catalog name (https://www.tensorflow.org/datasets/catalog)"
        ) from None
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"dataset {name!r} is not prepared in {data_dir}; set --config.data.download=True "
                "or prepare it with `tfds build`"
            )
        try:
            builder.download_and_prepare()
        except AssertionError as e:
            if "manual" in str(e).lower():
                raise FileNotFoundError(
                    f"{name} needs a manual download. Put the archives (for imagenet2012: "
                    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar) in "
                    f"{os.path.join(data_dir, 'downloads', 'manual')} and run again, or prepare "
                    f"it once with `tfds build {name} --data_dir={data_dir} --manual_dir=DIR`. "
                    "See README 'Preparing ImageNet'."
                ) from None
            raise
    return builder


def _eval_split(splits) -> str:
    for candidate in EVAL_SPLIT_PREFERENCE:
        if candidate in splits:
            return candidate
    raise ValueError(f"no evaluation split among {sorted(splits)}; set config.data.eval_split")


def info_from_builder(name: str, builder: Any, train_split: str | None, eval_split: str | None) -> DatasetInfo:
    """A :class:`DatasetInfo` from a tfds builder's metadata."""
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    if (image_key, label_key) != ("image", "label"):
        raise ValueError(f"{name}: expected features 'image' and 'label', got {image_key!r}, {label_key!r}")
    label = info.features["label"]
    image = info.features["image"]
    train_split = train_split or "train"
    eval_split = eval_split or _eval_split(info.splits)
    for split in (train_split, eval_split):
        if split.split("[")[0] not in info.splits:
            raise ValueError(f"{name} has no split {split!r}; it has {sorted(info.splits)}")
    shape = tuple(image.shape)
    return DatasetInfo(
        name=name,
        num_classes=label.num_classes,
        train_split=train_split,
        eval_split=eval_split,
        num_train=info.splits[train_split].num_examples,
        num_eval=info.splits[eval_split].num_examples,
        image_shape=None if None in shape else shape,
        class_names=tuple(label.names) if label.names else None,
        encoded=None in shape,
    )
