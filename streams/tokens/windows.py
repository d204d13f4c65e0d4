"""Token shards as a stream: windows of `block_size` tokens read from the mapped shards on
demand (`ShardWindows`), one experience per domain (`shard_stream`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from streams.experience import Experience, Stream
from streams.lazy import LazyData, LazyInputs
from streams.text import TokenTransform
from streams.tokens.format import ShardError
from streams.tokens.shards import TokenShard, read_manifest, shards_folder

class ShardWindows(torch.utils.data.Dataset):
    """Windows over a shard: item i is (tokens[i*stride : i*stride + block_size], the next
    tokens), int64 tensors read on access. `starts`, when given, lists the windows' first
    tokens instead (a subset); `shard_ids` then says which of `shards` each reads (a union)."""

    item_dtype = torch.int64

    def __init__(self, shard: TokenShard | Sequence[TokenShard], block_size: int, stride: int | None = None,
                 starts: np.ndarray | None = None, shard_ids: np.ndarray | None = None):
        self.shards = [shard] if isinstance(shard, TokenShard) else list(shard)
        self.block_size, self.stride = int(block_size), int(stride or block_size)
        if self.block_size < 1 or self.stride < 1:
            raise ValueError(f"block_size and stride must be positive, got {block_size} and {stride}")
        self.starts, self.shard_ids = starts, shard_ids
        if starts is None:
            if len(self.shards) != 1:
                raise ValueError("ShardWindows over several shards needs their starts and shard_ids")
            self.n = max(0, (len(self.shards[0]) - self.block_size - 1) // self.stride + 1)
        else:
            self.n = len(starts)
        self.item_shape = (self.block_size,)

    @property
    def shard(self) -> TokenShard:
        return self.shards[0]

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.shards)

    def __len__(self) -> int:
        return self.n

    def positions(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(self.n)[index]
        pos = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        pos = np.where(pos < 0, pos + self.n, pos)
        if len(pos) and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"window {int(pos.max() if pos.max() >= self.n else pos.min())} of {self.n}")
        return pos

    def read(self, index) -> torch.Tensor:
        """(k, block_size + 1) int64: the windows at these positions, with their next token."""
        pos = self.positions(index)
        length = self.block_size + 1
        if self.starts is None:
            return torch.from_numpy(self.shard.windows(pos * self.stride, length))
        starts = np.asarray(self.starts)[pos]
        if self.shard_ids is None:
            return torch.from_numpy(self.shards[0].windows(starts, length))
        ids = np.asarray(self.shard_ids)[pos]
        out = np.empty((len(pos), length), dtype=np.int64)
        for k in np.unique(ids).tolist():
            rows = ids == k
            out[rows] = self.shards[k].windows(starts[rows], length)
        return torch.from_numpy(out)

    def __getitem__(self, i: int):
        w = self.read([i])[0]
        return w[:-1], w[1:]

    def __getitems__(self, indices: list[int]):
        w = self.read(indices)
        x, y = w[:, :-1], w[:, 1:]
        return [(x[k], y[k]) for k in range(len(indices))]

    def window_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, first token) of every window."""
        starts = np.arange(self.n, dtype=np.int64) * self.stride if self.starts is None else np.asarray(self.starts)
        ids = np.zeros(self.n, np.int16) if self.shard_ids is None else np.asarray(self.shard_ids)
        return ids, starts

    def take(self, positions) -> "ShardWindows":
        pos = self.positions(positions)
        ids, starts = self.window_starts()
        return ShardWindows(self.shards, self.block_size, self.stride, starts[pos],
                            None if len(self.shards) == 1 else ids[pos])

    @staticmethod
    def union(parts: Sequence["ShardWindows"]) -> "ShardWindows":
        if len({p.block_size for p in parts}) != 1:
            raise ValueError("cannot join windows of different block sizes")
        shards, ids, starts = [], [], []
        for p in parts:
            pid, pstart = p.window_starts()
            ids.append(pid.astype(np.int16) + len(shards))
            starts.append(pstart)
            shards.extend(p.shards)
        return ShardWindows(shards, parts[0].block_size, parts[0].stride, np.concatenate(starts),
                            np.concatenate(ids))


class WindowInputs(LazyInputs):
    """`data.x` of windows: shape (N, block_size), int64, rows read on indexing (on the CPU)."""

    device = torch.device("cpu")

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.dataset.read([index])[0, :-1]
        return self.dataset.read(index)[:, :-1]


class WindowTargets:
    """`data.y` of windows: the (N, block_size) int64 next-token targets, read on indexing,
    never held (a shard's targets are the shard again, 4 or 8 times over as int64). It answers
    what the trainer asks of labels: len, shape, dim, dtype, device, indexing; `numpy()` and
    moving to another device read them all."""

    dtype = torch.int64
    device = torch.device("cpu")

    def __init__(self, dataset: ShardWindows):
        self.dataset = dataset
        self.shape = torch.Size((len(dataset), dataset.block_size))

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 2

    ndim = property(dim)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def element_size(self) -> int:
        return 8

    def long(self) -> "WindowTargets":
        return self

    cpu = contiguous = long

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.dataset.read([index])[0, 1:]
        return self.dataset.read(index)[:, 1:]

    def materialize(self) -> torch.Tensor:
        return self[slice(None)]

    def numpy(self) -> np.ndarray:
        return self.materialize().numpy()

    def to(self, device, *args, **kwargs):
        if torch.device(device).type == "cpu":
            return self
        return self.materialize().to(device, *args, **kwargs)

    def __repr__(self) -> str:
        return f"WindowTargets(shape={tuple(self.shape)}, dtype=torch.int64)"


class WindowData(LazyData):
    """A LazyData of shard windows: `x` (N, block_size) and `y` (its targets) read on demand,
    `t` one task label for all. Batches come through a DataLoader (`num_workers`), x and y
    from the same read."""

    def __init__(self, dataset: ShardWindows, task: int = 0, num_workers: int = 0, t: torch.Tensor | None = None):
        self.dataset = dataset
        self.y = WindowTargets(dataset)
        n = len(dataset)
        self.t = torch.full((1,), int(task), dtype=torch.long).expand(n) if t is None else t
        self.num_workers = num_workers
        self.pin_memory = False
        self.x = WindowInputs(dataset) if n else None

    def subset(self, index) -> "WindowData":
        positions = torch.arange(len(self))[index]
        return WindowData(self.dataset.take(positions), num_workers=self.num_workers, t=self.t[positions])

    def with_task(self, task: int) -> "WindowData":
        return WindowData(self.dataset, task, self.num_workers)

    @property
    def classes(self) -> list[int]:
        return list(range(self.dataset.vocab_size))

    @property
    def fingerprint(self) -> str:
        """What a run's provenance records of these windows without reading their targets: the
        shard files (domain, name and size: a re-tokenized shard differs), the window size and
        stride, and every window's start and shard."""
        import hashlib

        d = self.dataset
        h = hashlib.blake2b(digest_size=8)
        for shard in d.shards:
            h.update(f"{shard.path.parent.name}/{shard.path.name}:{shard.path.stat().st_size};".encode())
        h.update(f"{d.block_size}/{d.stride}:{len(self)}".encode())
        for part in (d.starts, d.shard_ids):
            if part is not None:
                h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()

    @staticmethod
    def concat(parts: Sequence["WindowData"]) -> "WindowData":
        parts = [p for p in parts if len(p)]
        return WindowData(ShardWindows.union([p.dataset for p in parts]), num_workers=parts[0].num_workers,
                          t=torch.cat([p.t for p in parts]))

    def pinned(self) -> "WindowData":
        copy = WindowData(self.dataset, num_workers=self.num_workers, t=self.t)
        copy.pin_memory = True
        return copy

    def batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                start_batch: int = 0, part: tuple[int, int] = (0, 1)):
        """As LazyData.batches (the same order from the same generator), targets from the same read."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        sampler = list(torch.utils.data.BatchSampler(order.tolist(), batch_size, drop_last=False))
        sampler = sampler[start_batch + part[0]::part[1]]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, persistent_workers=False,
                                             generator=torch.Generator().manual_seed(0))
        for batch_index, (x, y) in zip(sampler, loader):
            yield x, y, self.t[torch.tensor(batch_index)]


class ShardTransform(TokenTransform):
    """Token ids stay integers (int64); describes the tokenizer the shards were written with."""

    def __init__(self, tokenizer: dict, vocab_size: int, folder: str):
        self.tokenizer, self.vocab_size, self.folder = tokenizer, vocab_size, folder

    def describe(self) -> dict:
        return {"tokens": self.tokenizer.get("name"), "tokenizer_kind": self.tokenizer.get("kind"),
                "tokenizer_sha256": self.tokenizer.get("sha256"), "vocab_size": self.vocab_size,
                "shards": self.folder}


def shard_stream(shards: str, domains: list[str] | None = None, block_size: int = 128, stride: int | None = None,
                 max_train_tokens: int | None = None, max_val_tokens: int | None = None,
                 data_dir: str | None = None, seed: int = 0, num_workers: int = 0, verify: bool = False) -> Stream:
    """One experience per domain of a folder `cl tokenize` wrote (`shards`, under the data root
    when relative), in the given order (default: the manifest's): its training windows of
    `block_size` tokens every `stride` (default `block_size`), read lazily from the shard, and
    its validation windows (never overlapping) as its test set. `max_train_tokens` and
    `max_val_tokens` cap each domain's tokens read (the start of each split). `verify` checks
    every shard's sha256 against the manifest (reads them whole once). The vocabulary is the
    manifest's; `seed` is unused (the windows are fixed; training draws their order)."""
    folder = shards_folder(shards, data_dir)
    m = read_manifest(folder, domains, verify)
    names = list(domains) if domains is not None else [d["name"] for d in m["domains"]]
    if not names:
        raise ShardError("shard_stream: give at least one domain")
    vocab, dtype = m["vocab_size"], m["dtype"]
    experiences = []
    for k, name in enumerate(names):
        data = {}
        for split, cap, step in (("train", max_train_tokens, stride or block_size), ("val", max_val_tokens, block_size)):
            shard = TokenShard(folder / name / f"{split}.bin", dtype, vocab)
            windows = ShardWindows(shard, block_size, step)
            if cap is not None:
                windows = windows.take(np.arange(max(0, min(len(windows), (cap - block_size - 1) // step + 1))))
            if len(windows) < 1:
                raise ShardError(f"{shard.path}: {len(shard)} tokens{'' if cap is None else f' (capped at {cap})'} "
                                 f"are too few for one window of block_size {block_size}")
            data[split] = WindowData(windows, 0, num_workers)
        experiences.append(Experience(k, 0, list(range(vocab)), data["train"], data["val"], task_index=k))
    label = Path(shards).name or "shards"
    return Stream(f"shards-{label}-" + "-".join(names), experiences, ShardTransform(m["tokenizer"], vocab, str(folder)),
                  (block_size,), vocab, list(range(vocab)), task_classes=[list(range(vocab))] * len(experiences),
                  schedule={"kind": "shard_stream", "shards": str(shards), "domains": names, "block_size": block_size,
                            "stride": stride or block_size, "max_train_tokens": max_train_tokens,
                            "max_val_tokens": max_val_tokens, "vocab_size": vocab,
                            "tokenizer": m["tokenizer"].get("name"), "tokenizer_sha256": m["tokenizer"].get("sha256"),
                            # for the loss per byte: each domain's validation text, bytes over tokens
                            # (the whole split's ratio, also where max_val_tokens reads its start only)
                            "bytes_per_token": [m["by_name"][d]["val"]["bytes"] / max(m["by_name"][d]["val"]["tokens"], 1)
                                                for d in names]})


