"""Data sources, scenarios and the Stream of Experience objects they build.

`DATASETS` and `SCENARIOS` name the built-in components; the lab's registry
(`cl.config.registry`) starts from them and adds plugins. Nothing here imports `cl`.
"""
from streams.experience import BatchTransform, Dataset, Experience, Stream, TensorData
from streams.domain import permuted, rotated
from streams.interop import avalanche, from_avalanche
from streams.user_data import image_folder, numpy_arrays, torch_dataset
from streams.multi_dataset import multi_dataset
from streams.online import blur, online
from streams.power_law import power_law, power_law_schedule, recurrence_rates
from streams.scenarios import class_incremental
from streams.text import TokenTransform, token_stream
from streams.sources import DatasetNotFoundError, cifar10, cifar100, data_root, digits, mnist
from streams.tiny_imagenet import tiny_imagenet
from streams.cub200 import cub200
from streams.imagenet_subset import imagenet_subset
from streams.core50 import core50
from streams.clear import clear
from streams.imagenet_r import imagenet_a, imagenet_r
from streams.domainnet import domainnet, domainnet_domains
from streams.tokens import shard_stream

DATASETS = {
    "digits": digits, "mnist": mnist, "cifar10": cifar10, "cifar100": cifar100, "tiny_imagenet": tiny_imagenet,
    "cub200": cub200, "imagenet_subset": imagenet_subset, "imagenet_r": imagenet_r, "imagenet_a": imagenet_a,
    "domainnet": domainnet,
    "numpy": numpy_arrays, "image_folder": image_folder, "torch_dataset": torch_dataset,
}
SCENARIOS = {
    "class_incremental": class_incremental, "permuted": permuted, "rotated": rotated, "power_law": power_law,
    "multi_dataset": multi_dataset, "token_stream": token_stream, "avalanche": avalanche, "core50": core50,
    "clear": clear, "domainnet_domains": domainnet_domains, "shard_stream": shard_stream,
}

__all__ = [
    "BatchTransform", "DATASETS", "Dataset", "DatasetNotFoundError", "Experience", "SCENARIOS", "Stream",
    "TensorData", "TokenTransform", "avalanche", "blur", "cifar10", "cifar100", "class_incremental", "clear", "core50", "cub200", "domainnet", "domainnet_domains", "data_root", "digits",
    "from_avalanche", "image_folder", "imagenet_a", "imagenet_r", "imagenet_subset", "mnist", "multi_dataset", "numpy_arrays", "online", "permuted", "power_law",
    "power_law_schedule", "recurrence_rates", "rotated", "shard_stream", "tiny_imagenet", "token_stream", "torch_dataset",
]
