"""Data sources, scenarios and the Stream of Experience objects they build."""
from streams.experience import BatchTransform, Dataset, Experience, Stream, TensorData
from streams.scenarios import class_incremental
from streams.sources import DatasetNotFoundError, cifar10, data_root, digits, mnist

__all__ = [
    "BatchTransform", "Dataset", "DatasetNotFoundError", "Experience", "Stream", "TensorData",
    "cifar10", "class_incremental", "data_root", "digits", "mnist",
]
