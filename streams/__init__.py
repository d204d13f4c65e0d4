"""Data sources, scenarios and the Stream of Experience objects they build."""
from streams.experience import BatchTransform, Dataset, Experience, Stream, TensorData
from streams.domain import permuted, rotated
from streams.interop import from_avalanche
from streams.user_data import image_folder, numpy_arrays, torch_dataset
from streams.multi_dataset import multi_dataset
from streams.online import blur, online
from streams.power_law import power_law, power_law_schedule, recurrence_rates
from streams.scenarios import class_incremental
from streams.text import TokenTransform, token_stream
from streams.sources import DatasetNotFoundError, cifar10, data_root, digits, mnist

__all__ = [
    "BatchTransform", "Dataset", "DatasetNotFoundError", "Experience", "Stream", "TensorData",
    "blur", "cifar10", "from_avalanche", "image_folder", "numpy_arrays", "torch_dataset", "class_incremental", "data_root", "digits", "mnist", "multi_dataset", "online", "permuted", "power_law",
    "power_law_schedule", "recurrence_rates", "rotated", "token_stream", "TokenTransform",
]
