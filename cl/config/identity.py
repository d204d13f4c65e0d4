"""Which configuration a run belongs to: a short hash of the resolved configuration, kept
with its checkpoints and journals, so a resume with another configuration is refused."""
from __future__ import annotations

import hashlib
import json

from cl.config.params import flatten


class ConfigChangedError(ValueError):
    """A resume with another configuration than the one the run started with."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every flattened key whose value differs."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]
