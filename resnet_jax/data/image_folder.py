"""``image_folder:PATH``: a user's own images, prepared once into tfds format.

Layouts:

* ``PATH/train/<class>/*.jpg`` and ``PATH/val/<class>/*`` (``val``, ``validation``
  or ``test``): those splits;
* ``PATH/<class>/*``: one pool split by a fixed hash of each file's relative path
  into ``train`` and ``val`` (``val_fraction``, default 10%).

Files ending in .jpg/.jpeg/.png (any case) are read; every file is checked by
decoding it. Unreadable or non-image files are skipped, counted, reported by path
on stdout and listed in ``<data_dir>/.../skipped_files.txt``; with ``strict=True``
the first one raises an error naming it instead. Images are stored JPEG-encoded
(PNG files are re-encoded at quality 95) so the ImageNet preprocessing can decode
only its crop window. The prepared copy lives under ``data_dir`` keyed by a hash of
the folder's file list (paths and sizes), so changing the folder re-prepares it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_FOLDERS = ("val", "validation", "test")


def _list_images(root: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(files)


def scan_folder(root: str, val_fraction: float = 0.1) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """``({split: [(relative path, class name)]}, sorted class names)`` of ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    eval_dir = next((d for d in EVAL_FOLDERS if d in subdirs), None)
    splits: dict[str, list[tuple[str, str]]] = {}
    if "train" in subdirs and eval_dir:
        for split, folder in (("train", "train"), ("val", eval_dir)):
            splits[split] = [
                (os.path.join(folder, f), f.split(os.sep)[0])
                for f in _list_images(os.path.join(root, folder))
                if os.sep in f
            ]
    else:
        splits = {"train": [], "val": []}
        for f in _list_images(root):
            if os.sep not in f:
                continue
            bucket = int(hashlib.sha1(f.encode()).hexdigest()[:8], 16) / 2**32
            splits["val" if bucket < val_fraction else "train"].append((f, f.split(os.sep)[0]))
    classes = sorted({c for items in splits.values() for _, c in items})
    if not classes or not splits["train"]:
        raise ValueError(
            f"{root} has no images in class sub-folders; expected {root}/train/<class>/*.jpg and "
            f"{root}/val/<class>/*.jpg, or {root}/<class>/*.jpg"
        )
    return splits, classes


def _folder_key(root: str, splits: dict[str, list[tuple[str, str]]]) -> str:
    digest = hashlib.sha1(os.path.abspath(root).encode())
    for split, items in sorted(splits.items()):
        for path, _ in items:
            digest.update(f"{split}:{path}:{os.path.getsize(os.path.join(root, path))}".encode())
    return digest.hexdigest()[:12]


def _read_image(path: str) -> bytes:
    """JPEG bytes of ``path``; raises ValueError if it is not a readable image."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "JPEG" and image.mode == "RGB":
                return data
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=95)
            return out.getvalue()
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


@functools.cache
def _builder_class(key: str):
    from resnet_jax.data.datasets import import_tf

    import_tf()
    import tensorflow_datasets as tfds

    class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        name = f"image_folder_{key}"

        def __init__(self, *, root, splits, classes, strict, **kwargs):
            self._root, self._splits, self._classes, self._strict = root, splits, classes, strict
            self.skipped: list[str] = []
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description=f"Images from {self._root}",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=self._classes),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(items) for split, items in self._splits.items() if items}

        def _generate_examples(self, items):
            for rel, label in items:
                path = os.path.join(self._root, rel)
                try:
                    data = _read_image(path)
                except ValueError as e:
                    if self._strict:
                        raise
                    self.skipped.append(str(e))
                    continue
                yield rel, {"image": io.BytesIO(data), "label": label}

    return ImageFolderBuilder


def prepare_image_folder(root: str, data_dir: str, val_fraction: float = 0.1, strict: bool = False) -> Any:
    """The prepared tfds builder for the folder ``root`` (prepared on first use)."""
    root = os.path.abspath(os.path.expanduser(root))
    splits, classes = scan_folder(root, val_fraction)
    key = _folder_key(root, splits)
    builder = _builder_class(key)(
        root=root, splits=splits, classes=classes, strict=strict, data_dir=os.path.join(data_dir, "image_folder")
    )
    if not builder.is_prepared():
        total = sum(len(v) for v in splits.values())
        print(f"preparing {root}: {total} files, {len(classes)} classes -> {builder.data_dir}", flush=True)
        builder.download_and_prepare()
        if builder.skipped:
            report = os.path.join(builder.data_dir, "skipped_files.txt")
            with open(report, "w") as f:
                f.write("\n".join(builder.skipped) + "\n")
            print(
                f"skipped {len(builder.skipped)} unreadable file(s) (listed in {report}):\n  "
                + "\n  ".join(builder.skipped[:10]),
                flush=True,
            )
    return builder
