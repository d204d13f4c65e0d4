"""The token-shard format: its constants, names and checksums (see `streams.tokens`)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

FORMAT = "cl-token-shards"
VERSION = 1
SPLITS = ("train", "val")
DOCUMENTS = ("paragraphs", "lines")  # what a document of a corpus is
BYTE_SEPARATOR = 0  # NUL: the separator of byte shards, a byte no text holds
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")
_CHUNK = 8 << 20  # bytes of a corpus read at a time
_BATCH = 1 << 20  # bytes of documents tokenized at a time
_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class ShardError(ValueError):
    """A shard folder, its manifest or one of its files is not what it should be (one line, naming it)."""



# ---------------------------------------------------------------------------------- checksums

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{_sha256_file(p)}\n".encode())
    return h.hexdigest()


def dtype_for(vocab_size: int) -> str:
    """uint16 where every id fits in 16 bits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_domain(name) -> str:
    """A domain is a plain name (it names a folder of the shard directory): no `/`, no `..`."""
    if not isinstance(name, str) or not _DOMAIN.fullmatch(name) or ".." in name:
        raise ShardError(f"domain name {name!r} is not a plain name (letters, digits, . _ + -, not starting "
                         f"with . and without ..): it names a folder")
    return name


