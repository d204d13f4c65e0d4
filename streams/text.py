"""Token streams for continual language-model pre-training.

Each experience is one text domain (a corpus file `text/<domain>.txt` under the
data root), read as UTF-8 bytes: a byte-level vocabulary of 256 symbols shared
by every domain, so English prose, French and ABC music notation differ only
in their statistics (Gupta et al. 2023; Ibrahim et al. 2024 study such shifts).
A domain's first (1 - val_fraction) bytes are its training text, the rest its
validation text; both are cut into sequences of `block_size` + 1 bytes, and a
sample is (bytes[:-1], bytes[1:]): inputs and next-byte targets.
"""
from __future__ import annotations


import numpy as np
import torch

from streams.experience import Experience, Stream, TensorData

VOCAB_SIZE = 256


class TokenTransform:
    """Token ids stay integers: the batch transform of a token stream only casts to int64."""

    augments = False

    def __call__(self, x: torch.Tensor, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.long()

    def describe(self) -> dict:
        return {"tokens": "bytes"}


def _sequences(tokens: np.ndarray, block_size: int, stride: int) -> TensorData:
    n = (len(tokens) - block_size - 1) // stride + 1
    if n < 1:
        raise ValueError(f"a text of {len(tokens)} bytes is too short for block_size {block_size}")
    starts = np.arange(n) * stride
    windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)[starts]
    seq = torch.from_numpy(np.ascontiguousarray(windows))
    return TensorData(seq[:, :-1].contiguous(), seq[:, 1:].long())


def token_stream(domains: list[str] = ("tiny-shakespeare", "wonderland", "wiki-fr-extract", "nottingham-jigs"),
                 block_size: int = 128, val_fraction: float = 0.1, stride: int | None = None,
                 max_train_bytes: int | None = None, max_val_bytes: int | None = None, data_dir: str | None = None,
                 seed: int = 0) -> Stream:
    """One experience per text domain, in the given order, byte-level (see the module docstring).

    `stride` (default `block_size`) is the step between training sequences; validation
    sequences never overlap. `max_train_bytes` caps each domain's training text and
    `max_val_bytes` its validation text (the start of its held-out tail): continual
    evaluation every few iterations reads every seen domain's validation text each time."""
    from streams.sources import DatasetNotFoundError, data_root

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = data_root(data_dir) / "text"
    experiences = []
    for k, domain in enumerate(domains):
        path = root / f"{domain}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in root.glob("*.txt")) if root.is_dir() else []
            raise DatasetNotFoundError(f"text domain '{domain}' not found: looked for {path}; "
                                       f"available there: {', '.join(have) or 'none'}. Set data_dir or CL_DATA_DIR.")
        tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        cut = int(len(tokens) * (1 - val_fraction))
        train_bytes = tokens[:cut] if max_train_bytes is None else tokens[:min(cut, max_train_bytes)]
        train = _sequences(train_bytes, block_size, stride or block_size).with_task(0)
        val_bytes = tokens[cut:] if max_val_bytes is None else tokens[cut:cut + max_val_bytes]
        val = _sequences(val_bytes, block_size, block_size).with_task(0)
        experiences.append(Experience(k, 0, list(range(VOCAB_SIZE)), train, val, task_index=k))
    return Stream("tokens-" + "-".join(domains), experiences, TokenTransform(), (block_size,), VOCAB_SIZE,
                  list(range(VOCAB_SIZE)), task_classes=[list(range(VOCAB_SIZE))] * len(experiences),
                  schedule={"kind": "token_stream", "domains": list(domains), "block_size": block_size,
                            "val_fraction": val_fraction, "stride": stride or block_size,
                            "max_train_bytes": max_train_bytes, "max_val_bytes": max_val_bytes,
                            "bytes_per_token": [1.0] * len(experiences)})
