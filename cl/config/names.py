"""Names are not paths: the one way a run label, experiment name or sweep name becomes a file name.

A name comes from an experiment file and may hold anything: separators, `..`, control
characters, a thousand characters. `file_name` maps every string to a name that is safe
as one component of a path on any common file system, bounded, deterministic, and distinct
for distinct strings (case-insensitive file systems included):

- a plain name (lowercase letters, digits, `_`, `.`, `-`; at most 64 characters; not
  starting with `.` or `-`, not ending with `.`, not shaped like a hashed name below, not
  a reserved device name) is its own file name, so `replay` stays `replay`;
- any other name becomes a readable prefix of its safe characters and a hash of the whole
  string: `EWC` is `EWC-<10 hex digits>`, `../../x` is `x-<10 hex digits>`.

A plain name never ends in ten lowercase hex digits alone or after a `-`, and a hashed one
always does, so the two kinds never meet; hashed names differ by their hash, which case-folding keeps.
"""
from __future__ import annotations

import hashlib
import re

#: The longest name kept as it is, and the longest readable prefix of a hashed one.
PLAIN_MAX, PREFIX_MAX, HASH_CHARS = 64, 48, 10
#: The longest file name `file_name` returns.
MAX_LENGTH = max(PLAIN_MAX, PREFIX_MAX + 1 + HASH_CHARS)

_PLAIN = re.compile(r"[a-z0-9_][a-z0-9_.-]*")
_HASHED_TAIL = re.compile(r"(^|-)[0-9a-f]{%d}$" % HASH_CHARS)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Names Windows gives to devices, whatever their extension.
_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def name_hash(name: str) -> str:
    """A short hash of every character of `name` (lowercase hex)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def is_plain(name: str, reserved: tuple[str, ...] = ()) -> bool:
    """Whether `name` is its own file name (see the module docstring)."""
    return (len(name) <= PLAIN_MAX and _PLAIN.fullmatch(name) is not None and not name.endswith(".")
            and _HASHED_TAIL.search(name) is None and name.split(".")[0] not in _DEVICES
            and name not in reserved)


def file_name(name: str, reserved: tuple[str, ...] = ()) -> str:
    """The file name standing for `name`: itself if plain, else a readable prefix of its safe
    characters and a hash of all of it; never empty, `.` or `..`, no separator, no control
    character, no leading `.` or `-`, at most `MAX_LENGTH` characters. `reserved`: names the
    caller keeps for files of its own (a journal folder's `parent`), which get hashed."""
    if not isinstance(name, str):
        raise TypeError(f"a name is a string, got {type(name).__name__}")
    if is_plain(name, reserved):
        return name
    prefix = _UNSAFE.sub("_", name).lstrip("._-")[:PREFIX_MAX].rstrip("._-")
    return f"{prefix}-{name_hash(name)}" if prefix else name_hash(name)
