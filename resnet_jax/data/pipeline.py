"""Input pipelines: one per process, yielding global ``jax.Array`` batches on the mesh.

``create_pipeline(data_cfg, seed, ...)`` returns an :class:`InputPipeline` with

* ``info``: the :class:`~resnet_jax.data.datasets.DatasetInfo`;
* ``train_batches(start_example)``: an endless iterator of this process's share of
  each global batch, ``{"image": (B_local, H, W, C), "label": (B_local,) int32}``
  numpy arrays, starting at ``start_example`` examples into this process's stream
  (``step * B_local`` after ``step`` steps): a resumed run sees exactly the batches
  an uninterrupted one would;
* ``eval_batches()``: one pass over the whole eval split, padded to whole batches
  with ``"mask"`` 1 for real examples and 0 for padding; every process yields the
  same number of batches (``num_eval_batches``), so each example counts once.

:func:`to_global_batches` turns those per-process numpy batches into global arrays
sharded along the mesh's data axis (``jax.make_array_from_process_local_data``)
and keeps ``prefetch`` batches in flight on the devices.

Training reads ``tfds.even_splits(train, process_count, drop_remainder=True)``:
equal disjoint shares (fewer than ``process_count`` examples of the split are
left out, which is logged); eval reads ``tfds.even_splits(eval, process_count)``:
disjoint shares covering every example.

Order within an epoch is a seeded shuffle of the process's share (the whole share
when it fits ``shuffle_buffer``, otherwise file order plus a buffer), reshuffled
per epoch with seed ``(seed, epoch)``; augmentation randomness is keyed by the
example's position in the stream. So the same seed and process count give the
same batches, and resuming at an example position skips only undecoded records.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from resnet_jax.data.datasets import FAKE, DatasetInfo

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


@dataclasses.dataclass
class InputPipeline:
    """One process's view of a dataset; see the module docstring."""

    info: DatasetInfo
    global_batch_size: int
    eval_batch_size: int
    process_index: int
    process_count: int
    _train_fn: Any
    _eval_fn: Any
    num_eval_batches: int
    train_examples_per_process: int

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch over the training split (at least 1)."""
        return max(1, self.info.num_train // self.global_batch_size)

    def train_batches(self, start_example: int = 0) -> Iterator[Batch]:
        return self._train_fn(start_example)

    def eval_batches(self) -> Iterator[Batch]:
        return self._eval_fn()


def check_batch_sizes(global_batch: int, eval_batch: int, process_count: int, device_count: int) -> None:
    """Fails early, before any compilation, on batch sizes the mesh cannot split."""
    for what, size in (("batch_size", global_batch), ("eval_batch_size", eval_batch)):
        if size <= 0 or size % device_count:
            raise ValueError(
                f"config.data.{what}={size} must be a positive multiple of the number of "
                f"devices ({device_count}) so that each device gets an equal share"
            )
        if size % process_count:
            raise ValueError(f"config.data.{what}={size} must divide by the process count {process_count}")


def create_pipeline(
    cfg: Any,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> InputPipeline:
    """Builds this process's pipeline for ``cfg`` (the ``data`` config section)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    device_count = jax.device_count() if device_count is None else device_count
    check_batch_sizes(cfg.batch_size, cfg.eval_batch_size, process_count, device_count)
    if cfg.name == FAKE:
        pipeline = _fake_pipeline(cfg, seed, process_index, process_count)
    else:
        pipeline = _tfds_pipeline(cfg, seed, process_index, process_count)
    if pipeline.train_examples_per_process < pipeline.local_batch_size:
        raise ValueError(
            f"{pipeline.info.name} has {pipeline.train_examples_per_process} training examples per process, "
            f"fewer than the per-process batch of {pipeline.local_batch_size} "
            f"(config.data.batch_size={cfg.batch_size}); lower config.data.batch_size"
        )
    return pipeline


# --------------------------------------------------------------------------- fake


def _fake_pipeline(cfg: Any, seed: int, process_index: int, process_count: int) -> InputPipeline:
    """Synthetic Gaussian images and uniform labels, no TensorFlow.

    The *global* batches are a function of ``seed`` alone (a pool of
    ``fake_pool_batches`` cycled, so benchmarks do not time the generator); each
    process takes its slice, so any process count sees the same global batches.
    The eval split is ``fake_eval_size`` examples, split into even shares.
    """
    size, classes, channels = int(cfg.image_size), int(cfg.num_classes), int(cfg.get("channels", 3))
    info = DatasetInfo(
        name=FAKE, num_classes=classes, train_split="train", eval_split="eval",
        num_train=int(cfg.fake_train_size), num_eval=int(cfg.fake_eval_size),
        image_shape=(size, size, channels), class_names=tuple(str(i) for i in range(classes)),
    )
    local = cfg.batch_size // process_count
    dtype = np.dtype(cfg.dtype) if cfg.dtype != "bfloat16" else jax.numpy.bfloat16

    def make(rng: np.random.Generator, n: int) -> Batch:
        return {
            "image": rng.standard_normal((n, size, size, channels), np.float32).astype(dtype),
            "label": rng.integers(0, classes, n, dtype=np.int32),
        }

    def mine(batch: Batch, start: int, count: int) -> Batch:
        return {k: v[start : start + count] for k, v in batch.items()}

    pool = [
        mine(make(np.random.default_rng((seed, i)), cfg.batch_size), process_index * local, local)
        for i in range(cfg.fake_pool_batches)
    ]

    def train(start_example: int) -> Iterator[Batch]:
        index = start_example // local
        while True:
            yield pool[index % len(pool)]
            index += 1

    shares = _even_shares(info.num_eval, process_count)
    offset = sum(shares[:process_index])
    eval_local = cfg.eval_batch_size // process_count
    num_eval_batches = math.ceil(max(shares) / eval_local)

    def evaluate() -> Iterator[Batch]:
        everything = mine(make(np.random.default_rng((seed, 10**9)), info.num_eval), offset, shares[process_index])
        for b in range(num_eval_batches):
            batch = mine(everything, b * eval_local, eval_local)
            real = len(batch["label"])
            batch = {k: np.concatenate([v, np.zeros((eval_local - real, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
            batch["mask"] = (np.arange(eval_local) < real).astype(np.float32)
            yield batch

    return InputPipeline(
        info, cfg.batch_size, cfg.eval_batch_size, process_index, process_count,
        train, evaluate, num_eval_batches, info.num_train // process_count,
    )


def _even_shares(total: int, parts: int) -> list[int]:
    """Sizes of ``tfds.even_splits(n=parts)``: the first ``total % parts`` get one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------- tfds


def _tfds_pipeline(cfg: Any, seed: int, process_index: int, process_count: int) -> InputPipeline:
    from resnet_jax.data import preprocess
    from resnet_jax.data.datasets import get_builder, import_tf, info_from_builder

    tf = import_tf()
    import tensorflow_datasets as tfds

    builder = get_builder(cfg.name, cfg.data_dir, download=cfg.download, strict_images=cfg.strict_images)
    info = info_from_builder(cfg.name, builder, cfg.train_split, cfg.eval_split)
    decoders = {"image": tfds.decode.SkipDecoding()} if info.encoded else None
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = cfg.get("threads", 0) or 0
    options.experimental_optimization.map_parallelization = True

    train_split = tfds.even_splits(info.train_split, n=process_count, drop_remainder=True)[process_index]
    eval_splits = tfds.even_splits(info.eval_split, n=process_count)
    _check_files_exist(builder, [train_split, eval_splits[process_index]], tf)
    n_train = builder.info.splits[train_split].num_examples
    dropped = info.num_train - n_train * process_count
    if dropped:
        log.info("training reads %d x %d examples; %d left out for equal shares", process_count, n_train, dropped)
    local = cfg.batch_size // process_count
    train_fn = preprocess.make_preprocess(cfg, info, train=True)
    eval_fn = preprocess.make_preprocess(cfg, info, train=False)
    fits = n_train <= cfg.shuffle_buffer

    def train(start_example: int) -> Iterator[Batch]:
        base = builder.as_dataset(
            split=train_split,
            decoders=decoders,
            shuffle_files=not fits,
            read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False),
        )
        if cfg.cache_train:
            base = base.cache()
        start_epoch, offset = divmod(int(start_example), n_train)

        def epoch(e):
            ds = base.shuffle(min(n_train, cfg.shuffle_buffer), seed=seed * 1_000_003 + e,
                              reshuffle_each_iteration=False)
            position = tf.data.Dataset.range(e * n_train, (e + 1) * n_train)
            return tf.data.Dataset.zip(position, ds)

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
        ds = ds.map(
            lambda i, ex: train_fn(ex, tf.stack([tf.cast(seed, tf.int64), i + process_index * 2**40])),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)
        return iter(tfds.as_numpy(ds))

    shares = [builder.info.splits[s].num_examples for s in eval_splits]
    eval_local = cfg.eval_batch_size // process_count
    num_eval_batches = math.ceil(max(shares) / eval_local)
    zero_seed = tf.zeros([2], tf.int64)

    def with_mask(ex):
        out = eval_fn(ex, zero_seed)
        out["mask"] = tf.constant(1.0, tf.float32)
        return out

    eval_ds = builder.as_dataset(split=eval_splits[process_index], decoders=decoders, shuffle_files=False)
    eval_ds = eval_ds.map(with_mask, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.cache_eval:
        eval_ds = eval_ds.cache()
    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), eval_ds.element_spec)
    ).repeat()
    eval_ds = eval_ds.concatenate(padding).batch(eval_local).take(num_eval_batches)
    eval_ds = eval_ds.prefetch(tf.data.AUTOTUNE).with_options(options)

    return InputPipeline(
        info, cfg.batch_size, cfg.eval_batch_size, process_index, process_count,
        train, lambda: iter(tfds.as_numpy(eval_ds)), num_eval_batches, n_train,
    )


def _check_files_exist(builder: Any, splits: list, tf: Any) -> None:
    """Fails before training, naming the file, when a prepared dataset lost a shard."""
    names = set(tf.io.gfile.listdir(str(builder.data_dir)))
    for split in splits:
        for instruction in builder.info.splits[split].file_instructions:
            filename = str(instruction.filename)
            if filename.rsplit("/", 1)[-1] not in names:
                raise FileNotFoundError(
                    f"data file {filename} of {builder.name} is missing. The prepared dataset in "
                    f"{builder.data_dir} is incomplete: restore the file, or delete that directory "
                    "to prepare the dataset again."
                )


# --------------------------------------------------------------------------- device


def to_global_batches(
    batches: Iterator[Batch], sharding: jax.sharding.Sharding, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Per-process numpy batches -> global arrays on ``sharding``, ``prefetch`` in flight.

    Each leaf's leading (batch) axis is this process's share of the global batch.
    """
    queue: collections.deque = collections.deque()

    def put(batch: Batch) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    for batch in batches:
        queue.append(put(batch))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
