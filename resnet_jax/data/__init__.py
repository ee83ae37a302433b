"""Input data: datasets by name, tf.data preprocessing, per-process pipelines.

Importing this package does not import TensorFlow; the tfds path imports it on use.
"""

from resnet_jax.data.datasets import KNOWN_DATASETS, DatasetInfo
from resnet_jax.data.pipeline import InputPipeline, create_pipeline, to_global_batches

__all__ = ["KNOWN_DATASETS", "DatasetInfo", "InputPipeline", "create_pipeline", "to_global_batches"]
