"""Features of a frozen backbone, computed once and kept.

When a run's backbone never changes (a strategy says `frozen_features`, e.g. nearest-mean
on a pre-trained extractor, Janson et al. 2022) and its training data are not augmented,
every sample's pooled pre-logit features are a fixed function of the sample. Computing them
once, instead of once per epoch, per evaluation and per run, makes such a run one forward
pass over the data. `FeatureCache.featurize` turns a stream of images into the same stream
of features and the model into `FeatureHead`, which has timm's feature API on those
features (`forward_features` is the identity, the head is the model's own); the trainer,
the strategies' `ctx.features` and evaluation then run unchanged.

Features are kept in memory for every run of one invocation (an experiment file's runs and
seeds), and on disk under `CL_CACHE_DIR` (default ~/.cache/cl-lab/features; `off` keeps
them in memory only), one safetensors file per (backbone, data, transform): the key hashes
the backbone's architecture, code versions and every weight but the classifier's, every byte of the inputs
and the transform that prepares them (`feature_key`). A file that cannot be read is computed
again. Inputs read lazily from disk (`LazyData`), and inputs whose transform cannot describe
itself, are not kept at all (hashing lazy inputs would read them all, which is what the cache
saves): their features are computed once per run, still once across its epochs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from cl.models import classifier_keys
from strategies.base import overrides
from strategies.context import eval_mode, pooled_features
from streams.experience import BatchTransform, Stream, TensorData

#: Part of every key: a change to how features are computed makes every old file a miss.
FEATURE_CACHE_VERSION = "1"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cl-lab" / "features"

log = logging.getLogger(__name__)


def cache_root() -> Path | None:
    """Where feature files go: `CL_CACHE_DIR`, else ~/.cache/cl-lab/features; None (memory
    only) when `CL_CACHE_DIR` is `off`."""
    env = os.environ.get("CL_CACHE_DIR")
    if env and env.strip().lower() in ("off", "none", "0"):
        return None
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR


class FeatureHead(nn.Module):
    """A model with a frozen backbone, on inputs that are already that backbone's pooled
    pre-logit features: `forward_features` is the identity, `forward_head(f, pre_logits=True)`
    gives `f` back and `forward_head(f)` applies the model's own classifier (the same module,
    not a copy). The logits equal the full model's wherever timm's `forward_head(f)` is the
    classifier applied to `forward_head(f, pre_logits=True)`, as for timm's models and the
    lab's."""

    def __init__(self, model: nn.Module, width: int):
        super().__init__()
        self.head = model.get_classifier()
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def wants_frozen_features(strategies) -> bool:
    """Whether a strategy of the run keeps the backbone frozen (`frozen_features`)."""
    return any(s.frozen_features for s in strategies)


def bypass_reason(strategies, stream: Stream, model: nn.Module) -> str | None:
    """Why this run's frozen features cannot be cached, or None when they can."""
    if getattr(stream.transform, "augments", False):
        return "the stream augments its training data, so a sample's features differ every epoch"
    owner = next((s for s in strategies if overrides(s, "forward")), None)
    if owner is not None:
        return f"{type(owner).__name__} replaces the forward pass, which needs the inputs themselves"
    if getattr(model, "uses_task_labels", False):
        return "a multi-head model picks its head by task label"
    if stream.is_sequence:
        return "a sequence model's features are per position"
    return None


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _code_versions(model: nn.Module) -> str:
    """The code that computes the features: torch's and timm's versions and the source of
    the model's class (a lab model edited, or timm upgraded, must not reuse old features)."""
    import inspect

    import timm

    try:
        source = inspect.getsource(type(model))
    except (OSError, TypeError):  # a class defined where its source cannot be read
        source = ""
    digest = hashlib.blake2b(source.encode(), digest_size=8).hexdigest()
    return f"torch {torch.__version__}|timm {timm.__version__}|{digest}"


def backbone_fingerprint(model: nn.Module, architecture: str = "") -> str:
    """A hash of what a model's features depend on: its class and the code behind it,
    `architecture` (the model's configuration, for settings that hold no weights, such as
    timm's `global_pool`) and every tensor of its state dict but the classifier's (a fresh
    head changes no feature)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{architecture}|{_code_versions(model)}".encode())
    head = classifier_keys(model)
    for name, tensor in sorted(model.state_dict().items()):
        if name not in head:
            h.update(name.encode())
            _update_tensor(h, tensor)
    return h.hexdigest()


def data_fingerprint(x: torch.Tensor) -> str:
    """A hash of every input (shape, dtype and bytes): a changed pixel is another key."""
    h = hashlib.blake2b(digest_size=16)
    _update_tensor(h, x)
    return h.hexdigest()


def transform_fingerprint(transform) -> str | None:
    """A hash of how raw inputs become model inputs (its class and `describe()`, the scale);
    None for a transform that cannot describe itself, whose features are then not kept on disk."""
    if transform is None:
        return "none"
    describe = getattr(transform, "describe", None)
    if describe is None:
        return None
    text = json.dumps({"class": f"{type(transform).__module__}.{type(transform).__qualname__}",
                       "scale": getattr(transform, "scale", None), **describe()}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def feature_key(backbone: str, data: str, transform: str) -> str:
    return hashlib.blake2b(f"v{FEATURE_CACHE_VERSION}|{backbone}|{data}|{transform}".encode(),
                           digest_size=20).hexdigest()


@dataclasses.dataclass
class FeatureStats:
    """What one `featurize` call cost: rows through the backbone, rows read from disk or from
    this invocation's memory, and the seconds spent on training and on test data."""

    rows_computed: int = 0
    rows_from_disk: int = 0
    rows_from_memory: int = 0
    train_time_s: float = 0.0
    test_time_s: float = 0.0


class FeatureCache:
    """Pooled features of a frozen backbone, by key (`feature_key`): in memory for the
    invocation, and under `root` on disk (None: memory only)."""

    def __init__(self, root: Path | None = None, batch_size: int = 512):
        self.root = root
        self.batch_size = batch_size
        self._memory: dict[str, torch.Tensor] = {}
        self._warned = False

    def featurize(self, stream: Stream, model: nn.Module, device: torch.device,
                  architecture: str = "") -> tuple[Stream, FeatureHead, FeatureStats]:
        """The stream with every experience's training data and every test set replaced by
        their features (labels, task labels and everything else kept), the model that runs on
        them, and what it cost. Each distinct input set passes through the backbone at most
        once per invocation, and not at all when its features are on disk."""
        stats = FeatureStats()
        backbone = backbone_fingerprint(model, architecture)
        transform = transform_fingerprint(stream.transform)
        done: dict[int, TensorData] = {}  # an experience's test set is also the stream's

        def features_of(data, split: str):
            if data is None:
                return None
            if id(data) not in done:
                start = time.perf_counter()
                x = self._features(data, model, device, stream.transform, backbone, transform, stats)
                done[id(data)] = TensorData(x, data.y, data.t)
                setattr(stats, f"{split}_time_s", getattr(stats, f"{split}_time_s") + time.perf_counter() - start)
            return done[id(data)]

        experiences = [dataclasses.replace(e, train=features_of(e.train, "train")) for e in stream.experiences]
        test_sets = [features_of(d, "test") for d in stream.test_sets]
        experiences = [dataclasses.replace(e, test=features_of(e.test, "test")) for e in experiences]
        width = test_sets[0].x.shape[1]
        featured = dataclasses.replace(stream, experiences=experiences, test_sets=test_sets,
                                       transform=BatchTransform(scale=1.0), input_shape=(width,))
        return featured, FeatureHead(model, width), stats

    def _features(self, data, model, device, transform, backbone: str, transform_key: str | None,
                  stats: FeatureStats) -> torch.Tensor:
        key = None
        if isinstance(data, TensorData) and transform_key is not None:
            key = feature_key(backbone, data_fingerprint(data.x), transform_key)
            if key in self._memory:
                stats.rows_from_memory += len(data)
                return self._memory[key]
            stored = self._read(key, len(data))
            if stored is not None:
                stats.rows_from_disk += len(data)
                self._memory[key] = stored
                return stored
        x = self._compute(data, model, device, transform)
        stats.rows_computed += len(data)
        if key is not None:
            self._memory[key] = x
            self._write(key, x)
        return x

    @torch.no_grad()
    def _compute(self, data, model, device, transform) -> torch.Tensor:
        """One forward pass in eval mode over `data`, prepared exactly as the trainer prepares
        an unaugmented batch (`transform(x)` on the device)."""
        parts = []
        with eval_mode(model):
            for x, _, _ in data.batches(self.batch_size, shuffle=False):
                x = x.to(device)
                parts.append(pooled_features(model, transform(x) if transform is not None else x).float().cpu())
        if not parts:  # no rows: the width from an empty batch's shape is unknown, ask one row of zeros
            with eval_mode(model):
                probe = torch.zeros((1,) + tuple(data.x.shape[1:]), dtype=data.x.dtype, device=device)
                width = pooled_features(model, transform(probe) if transform is not None else probe).shape[-1]
            return torch.zeros(0, width)
        return torch.cat(parts)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, rows: int) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            x = load_file(str(path))["features"]
        except Exception as err:  # a file cut short by a crash or a full disk: computed again
            log.warning(f"feature cache file {path} is unreadable ({err}); computing it again")
            return None
        return x if len(x) == rows else None

    def _write(self, key: str, x: torch.Tensor) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": x.contiguous()}, str(tmp),
                      metadata={"version": FEATURE_CACHE_VERSION, "rows": str(len(x)), "width": str(x.shape[1])})
            os.replace(tmp, path)  # whole or absent: a reader never sees half a file
        except BaseException as err:
            try:
                tmp.unlink(missing_ok=True)  # no .tmp left behind, whatever stopped the write
            except OSError:
                pass
            # A full disk is an OSError from Python and a SafetensorError from safetensors' writer:
            # either way the cache is an optimisation, and the run goes on without it.
            if not isinstance(err, Exception):
                raise
            if not self._warned:
                self._warned = True
                log.warning(f"cannot write the feature cache under {self.root} ({err}); features are "
                            f"kept in memory for this invocation only (set CL_CACHE_DIR to a writable folder)")
