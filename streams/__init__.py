"""Data sources, scenarios and the Stream of Experience objects they build."""
from streams.experience import BatchTransform, Dataset, Experience, Stream, TensorData
from streams.domain import permuted, rotated
from streams.online import blur, online
from streams.power_law import power_law, power_law_schedule, recurrence_rates
from streams.scenarios import class_incremental
from streams.sources import DatasetNotFoundError, cifar10, data_root, digits, mnist

__all__ = [
    "BatchTransform", "Dataset", "DatasetNotFoundError", "Experience", "Stream", "TensorData",
    "blur", "cifar10", "class_incremental", "data_root", "digits", "mnist", "online", "permuted", "power_law",
    "power_law_schedule", "recurrence_rates", "rotated",
]
