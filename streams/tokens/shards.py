"""Writing token shards once (`tokenize_corpora`, behind `cl tokenize`) and reading them back:
the manifest, checked, and each shard file mapped without being read whole (`TokenShard`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from streams.sources import DatasetNotFoundError, data_root
from streams.tokens.format import (DOCUMENTS, FORMAT, SPLITS, VERSION, _BATCH, _CHUNK, _DOMAIN, ShardError,
                                   _sha256_file, _sha256_folder, check_domain, dtype_for)
from streams.tokens.tokenizer import Tokenizer, _first_line, load_tokenizer, train_bpe

# ---------------------------------------------------------------------------------- documents

def iter_documents(path: str | os.PathLike, chunk_bytes: int = _CHUNK, hasher=None,
                   documents: str = "paragraphs") -> Iterator[bytes]:
    """The documents (paragraphs, see the module docstring; with `documents="lines"` every
    non-blank line, for corpora of one paragraph a line such as Wikipedia extracts) of a text
    file, as UTF-8 bytes, reading `chunk_bytes` at a time: a corpus larger than memory streams
    through. `hasher` (a hashlib object), when given, is fed every byte of the file."""
    if documents not in DOCUMENTS:
        raise ShardError(f"documents must be one of {', '.join(DOCUMENTS)}, got {documents!r}")
    by_line = documents == "lines"
    lines: list[bytes] = []
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            if hasher is not None and chunk:
                hasher.update(chunk)
            if not chunk:
                pieces, carry = ([carry] if carry else []), b""
            else:
                pieces = (carry + chunk).split(b"\n")
                carry = pieces.pop()  # the line the next chunk ends
            for line in pieces:
                if line.strip() and by_line:
                    yield line
                elif line.strip():
                    lines.append(line)
                elif lines:
                    yield b"\n".join(lines)
                    lines = []
            if not chunk:
                break
    if lines:
        yield b"\n".join(lines)


def _val_cut(lengths: np.ndarray, val_fraction: float, path) -> int:
    """How many documents stay for training: the rest is the shortest tail holding at least
    `val_fraction` of the bytes (one document at least, and one left for training)."""
    n = len(lengths)
    if n < 2:
        raise ShardError(f"{path}: {n} document(s); a corpus needs at least 2 (paragraphs separated by blank "
                         f"lines): one to train on, one to validate on")
    tail = np.cumsum(lengths[::-1])
    k = int(np.searchsorted(tail, val_fraction * tail[-1], side="left")) + 1
    return n - min(max(k, 1), n - 1)



# ---------------------------------------------------------------------------------- writing

def resolve_corpus(corpus: str, data_dir: str | None = None) -> tuple[str, Path]:
    """(domain, path) of a corpus: a text file, or a name under the data root
    (`text/<domain>.txt`, `<domain>.txt` under it, or just `<domain>`)."""
    path = Path(corpus).expanduser()
    if not path.is_file():
        root = data_root(data_dir)
        tried = [root / corpus, root / "text" / corpus, root / "text" / f"{corpus}.txt"]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise DatasetNotFoundError(f"corpus {corpus} not found: not a file, nor under the data root "
                                       f"({root / 'text'}); set --data-dir or CL_DATA_DIR")
        path = found
    name = path.name[:-4] if path.name.endswith(".txt") else path.stem
    return check_domain(name), path


class _SplitWriter:
    """Appends token ids to DIR/<domain>/<split>.bin.part, with the document index and checksum."""

    def __init__(self, folder: Path, split: str, dtype: str, vocab_size: int, separator: int):
        self.bin, self.idx = folder / f"{split}.bin", folder / f"{split}.idx.npy"
        self.f = open(self.bin.with_name(self.bin.name + ".part"), "wb")
        self.dtype, self.vocab_size, self.separator = np.dtype(dtype), vocab_size, separator
        self.h = hashlib.sha256()
        self.starts: list[int] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, documents: Sequence[bytes], ids: Sequence[np.ndarray]) -> None:
        if not ids:
            return
        lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
        flat = np.empty(int(lengths.sum()), dtype=np.int64)
        ends = np.cumsum(lengths)
        flat[ends - 1] = self.separator
        for i, end, n in zip(ids, ends, lengths):
            flat[end - n:end - 1] = i
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ShardError(f"the tokenizer gave id {int(flat.max())} outside its vocabulary of {self.vocab_size}")
        out = flat.astype(self.dtype)
        self.f.write(memoryview(out))
        self.h.update(memoryview(out))
        self.starts.extend((self.tokens + ends - lengths).tolist())
        self.tokens += len(flat)
        self.documents += len(ids)
        self.bytes += sum(len(d) for d in documents)

    def close(self) -> dict:
        self.f.close()
        os.replace(self.f.name, self.bin)
        np.save(self.idx, np.asarray(self.starts, dtype=np.int64))
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "sha256": self.h.hexdigest(), "index_sha256": _sha256_file(self.idx)}


def _batches(documents: Iterable[bytes], limit: int = _BATCH) -> Iterator[list[bytes]]:
    batch, size = [], 0
    for d in documents:
        batch.append(d)
        size += len(d)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _fingerprint(corpora: list[dict], tokenizer: dict, val_fraction: float, separator_id) -> dict:
    return {"format": FORMAT, "version": VERSION, "val_fraction": val_fraction, "separator_id": separator_id,
            "tokenizer": tokenizer, "corpora": [{k: c[k] for k in ("domain", "sha256", "bytes")} for c in corpora]}


def tokenize_corpora(corpora: Sequence[str], tokenizer: str = "bytes", out: str | os.PathLike = "shards",
                     val_fraction: float = 0.005, vocab_size: int | None = None, train: bool = False,
                     separator_id: int | None = None, force: bool = False, data_dir: str | None = None,
                     chunk_bytes: int = _CHUNK, log=print, documents: str = "paragraphs") -> dict:
    """Tokenize each corpus (a domain) into `out` (see the module docstring); the manifest,
    with `status` "written" or "unchanged" (the same inputs are already there: nothing is done).
    `train=True` trains a byte-level BPE of `vocab_size` on the corpora's training documents
    first and saves it as `out`/tokenizer.json. `documents` says what a document is
    (`paragraphs`, or `lines`). A folder holding other inputs is refused unless `force`."""
    if not 0.0 < val_fraction < 1.0:
        raise ShardError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if train and not vocab_size:
        raise ShardError("--train-bpe needs --vocab-size N")
    if vocab_size and not train:
        raise ShardError("--vocab-size is the size of a BPE to train: give --train-bpe too")
    out = Path(out).expanduser()
    resolved = [resolve_corpus(c, data_dir) for c in corpora]
    if not resolved:
        raise ShardError("give at least one corpus")
    names = [d for d, _ in resolved]
    if len(set(names)) != len(names):
        twice = sorted({d for d in names if names.count(d) > 1})
        raise ShardError(f"two corpora make the same domain {', '.join(twice)}: rename a file")

    # Pass 1: every corpus's checksum, and its documents' lengths for the validation cut.
    sources = []
    for domain, path in resolved:
        h = hashlib.sha256()
        lengths = np.fromiter((len(d) for d in iter_documents(path, chunk_bytes, h, documents)), dtype=np.int64)
        sources.append({"domain": domain, "path": str(path.resolve()), "sha256": h.hexdigest(),
                        "bytes": path.stat().st_size, "cut": _val_cut(lengths, val_fraction, path)})

    tok = None if train else load_tokenizer(tokenizer)
    tok_id = {"train_bpe": vocab_size} if train else {"kind": tok.kind, "sha256": tok.sha256()}
    fingerprint = {**_fingerprint(sources, tok_id, val_fraction, separator_id), "documents": documents}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("inputs") == fingerprint and not force:
            read_manifest(out)  # every shard still there, of its size
            old["status"] = "unchanged"
            return old
        if not force:
            raise ShardError(f"{out} holds shards of other inputs (corpora, tokenizer or settings differ from "
                             f"its manifest.json): give another --out, or --force to replace them")
        _remove_old(out, old)
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise ShardError(f"{out} is not empty and holds no manifest.json: give a new or empty --out, or --force "
                         f"to write there")
    out.mkdir(parents=True, exist_ok=True)

    if train:
        def training_documents():
            for s in sources:
                for k, d in enumerate(iter_documents(s["path"], chunk_bytes, documents=documents)):
                    if k >= s["cut"]:
                        break
                    yield d
        log(f"training a byte-level BPE of {vocab_size} tokens on {len(sources)} corpora")
        tok = train_bpe(training_documents(), vocab_size)
    separator = separator_id if separator_id is not None else tok.eos_id
    if separator is None:
        raise ShardError(f"tokenizer {tokenizer} has no end-of-text token: give --separator-id N, the id "
                         f"that separates documents")
    if not 0 <= separator < tok.vocab_size:
        raise ShardError(f"--separator-id {separator} is outside the vocabulary of {tok.vocab_size}")
    dtype = dtype_for(tok.vocab_size)
    saved = tok.save(out)
    tokenizer_entry = {"kind": "bpe-trained" if train else tok.kind, "name": tok.name, "file": saved,
                       "sha256": (_sha256_file(out / saved) if saved == "tokenizer.json" else
                                  _sha256_folder(out / saved) if saved else tok.sha256()),
                       "eos_token": tok.eos_token if separator == tok.eos_id else None}

    domains = []
    for s in sources:
        folder = out / s["domain"]
        folder.mkdir(exist_ok=True)
        writers = {split: _SplitWriter(folder, split, dtype, tok.vocab_size, separator) for split in SPLITS}
        k = 0
        for batch in _batches(iter_documents(s["path"], chunk_bytes, documents=documents)):
            ids = tok.encode(batch)
            n_train = max(0, min(len(batch), s["cut"] - k))
            writers["train"].add(batch[:n_train], ids[:n_train])
            writers["val"].add(batch[n_train:], ids[n_train:])
            k += len(batch)
        entry = {"name": s["domain"], "source": {"path": s["path"], "sha256": s["sha256"], "bytes": s["bytes"]}}
        entry.update({split: w.close() for split, w in writers.items()})
        log(f"{s['domain']}: {entry['train']['tokens']:,} training tokens ({entry['train']['documents']:,} "
            f"documents), {entry['val']['tokens']:,} validation tokens ({entry['val']['documents']:,})")
        domains.append(entry)

    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_entry, "vocab_size": tok.vocab_size,
                "dtype": dtype, "separator_id": separator,
                "documents": ("paragraphs: runs of non-blank lines joined by \\n" if documents == "paragraphs" else
                              "lines: every non-blank line") + "; each followed by separator_id",
                "val_fraction": val_fraction, "domains": domains, "inputs": fingerprint}
    tmp = manifest_path.with_name("manifest.json.part")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    manifest["status"] = "written"
    return manifest


def _remove_old(out: Path, old) -> None:
    """What an earlier `cl tokenize` wrote to `out` (by the fixed names, plain domain names only)."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "manifest.json.part"):
        (out / name).unlink(missing_ok=True)
    if (out / "tokenizer").is_dir():
        shutil.rmtree(out / "tokenizer")
    for d in (old or {}).get("domains", []) if isinstance(old, dict) else []:
        name = d.get("name") if isinstance(d, dict) else None
        if isinstance(name, str) and _DOMAIN.fullmatch(name) and ".." not in name:
            for split in SPLITS:
                for f in (f"{split}.bin", f"{split}.idx.npy", f"{split}.bin.part"):
                    (out / name / f).unlink(missing_ok=True)



# ---------------------------------------------------------------------------------- reading

def shards_folder(shards: str | os.PathLike, data_dir: str | None = None) -> Path:
    """The folder `cl tokenize` wrote: `shards` itself when absolute, else under the data root."""
    path = Path(shards).expanduser()
    return path if path.is_absolute() else data_root(data_dir) / path


def read_manifest(folder: str | os.PathLike, domains: Sequence[str] | None = None, verify: bool = False) -> dict:
    """The manifest of a shard folder, checked: its format, dtype and vocabulary, plain domain
    names, and every shard of the `domains` (default all) there with the size its token count
    says (and, with `verify`, its sha256). A failure is one line naming the file."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found: {folder} is not a folder `cl tokenize` wrote")
    try:
        m = json.loads(path.read_text())
    except ValueError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise ShardError(f"{path}: format version {m.get('version')}, this reader knows {VERSION}: re-tokenize")
    dtype, vocab = m.get("dtype"), m.get("vocab_size")
    if dtype not in ("uint16", "uint32"):
        raise ShardError(f"{path}: dtype {dtype!r}, expected uint16 or uint32")
    if not isinstance(vocab, int) or not 0 < vocab <= np.iinfo(dtype).max + 1:
        raise ShardError(f"{path}: vocab_size {vocab!r} does not fit its dtype {dtype}")
    entries = m.get("domains")
    if not isinstance(entries, list) or not entries:
        raise ShardError(f"{path}: lists no domains")
    by_name = {}
    for e in entries:
        try:
            by_name[check_domain(e["name"])] = e
        except (TypeError, KeyError):
            raise ShardError(f"{path}: a domain entry without a name") from None
        except ShardError as err:
            raise ShardError(f"{path}: {err}") from None
    wanted = list(by_name) if domains is None else list(domains)
    for name in wanted:
        check_domain(name)
        if name not in by_name:
            raise DatasetNotFoundError(f"domain '{name}' not in {path}; it holds: {', '.join(by_name)}")
        for split in SPLITS:
            _check_split(folder, name, split, by_name[name].get(split), np.dtype(dtype), verify, path)
    m["by_name"] = by_name
    return m


def _check_split(folder: Path, name: str, split: str, entry, dtype: np.dtype, verify: bool, manifest: Path):
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in ("tokens", "documents")):
        raise ShardError(f"{manifest}: domain {name} has no {split} token and document counts")
    bin_, idx = folder / name / f"{split}.bin", folder / name / f"{split}.idx.npy"
    for f in (bin_, idx):
        if not f.is_file():
            raise DatasetNotFoundError(f"{f} not found: the shard folder is incomplete; rerun cl tokenize --force")
    size, expected = bin_.stat().st_size, entry["tokens"] * dtype.itemsize
    if size != expected:
        raise ShardError(f"{bin_}: {size} bytes, but the manifest says {entry['tokens']} {dtype.name} tokens "
                         f"({expected} bytes): truncated or not this manifest's shard; rerun cl tokenize --force")
    try:
        index = np.load(idx, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ShardError(f"{idx}: not a document index ({_first_line(err)})") from None
    if index.dtype != np.int64 or index.shape != (entry["documents"],) or \
            len(index) and (index[0] != 0 or index[-1] >= max(entry["tokens"], 1)):
        raise ShardError(f"{idx}: not the index of {entry['documents']} documents in {bin_.name}")
    if verify:
        for f, key in ((bin_, "sha256"), (idx, "index_sha256")):
            if entry.get(key) is not None and _sha256_file(f) != entry[key]:
                raise ShardError(f"{f}: sha256 differs from the manifest's: the file changed since "
                                 f"cl tokenize wrote it; rerun cl tokenize --force")



class TokenShard:
    """The token ids of a .bin shard, mapped read-only (np.memmap, mode "r"), never read whole:
    `shard[a:b]` reads just those tokens. Where the whole file cannot be mapped (a process with
    a small address-space limit, or `segment_tokens` given) it maps pieces of `segment_tokens`
    at a time instead, a few kept. Picklable for DataLoader workers: each maps it anew."""

    def __init__(self, path: str | os.PathLike, dtype="uint16", vocab_size: int | None = None,
                 segment_tokens: int | None = None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        if self.dtype not in (np.uint8, np.uint16, np.uint32):
            raise ShardError(f"{self.path}: dtype {self.dtype}, expected uint16 or uint32")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ShardError(f"{self.path}: {size} bytes is not a whole number of {self.dtype.name} tokens")
        self.n = size // self.dtype.itemsize
        self.vocab_size = vocab_size or int(np.iinfo(self.dtype).max) + 1
        self.segment_tokens = segment_tokens
        self._whole = self._pieces = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_whole": None, "_pieces": None}

    def _map(self, offset: int, count: int) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset * self.dtype.itemsize, shape=(count,))

    def _segment(self, k: int) -> np.ndarray:
        if self._pieces is None:
            self._pieces = {}
        if k not in self._pieces:
            if len(self._pieces) >= 4:
                self._pieces.pop(next(iter(self._pieces)))  # the oldest goes: its mapping is released
            start = k * self.segment_tokens
            self._pieces[k] = self._map(start, min(self.segment_tokens, self.n - start))
        return self._pieces[k]

    def _mapped(self) -> np.ndarray | None:
        if self._whole is None and not self.segment_tokens and self.n:
            try:
                self._whole = self._map(0, self.n)
            except (OSError, ValueError, MemoryError):  # ENOMEM: map pieces instead
                self.segment_tokens = 1 << 22
        return self._whole

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] (a view of the map where it is whole, else a copy)."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"{self.path}: tokens {start}:{stop} outside its {self.n}")
        whole = self._mapped()
        if whole is not None or start == stop:
            return whole[start:stop] if whole is not None else np.empty(0, self.dtype)
        s = self.segment_tokens
        parts = [self._segment(k)[max(start - k * s, 0):min(stop - k * s, s)]
                 for k in range(start // s, (stop - 1) // s + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            return self.read(start, max(start, stop))[::step]
        i = int(index) + (self.n if int(index) < 0 else 0)
        return self.read(i, i + 1)[0]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(k, length) int64: tokens[s:s + length] for every s in `starts`."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        whole = self._mapped()
        if whole is not None:
            return whole[starts[:, None] + np.arange(length)].astype(np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        for r, s in enumerate(starts.tolist()):
            out[r] = self.read(s, s + length)
        return out



def documents(folder: str | os.PathLike, domain: str, split: str = "train") -> Iterator[np.ndarray]:
    """The token ids of each document of a domain's split, without the separator."""
    folder = Path(folder)
    m = read_manifest(folder, [domain])
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shard = TokenShard(folder / domain / f"{split}.bin", m["dtype"])
    starts = np.load(folder / domain / f"{split}.idx.npy").tolist() + [len(shard)]
    for a, b in zip(starts[:-1], starts[1:]):
        yield np.asarray(shard.read(a, b - 1))


def bytes_per_token(folder: str | os.PathLike, domain: str, split: str = "val") -> float:
    """Source bytes per token of a split: loss in nats per token / this / ln 2 = bits per byte."""
    e = read_manifest(folder, [domain])["by_name"][domain][split]
    return e["bytes"] / max(e["tokens"], 1)


def open_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer a shard folder was written with (its saved copy), to decode its tokens."""
    folder = Path(folder)
    m = read_manifest(folder, domains=[])
    file = m["tokenizer"].get("file")
    if file is None:
        return Tokenizer()
    if file not in ("tokenizer.json", "tokenizer"):
        raise ShardError(f"{folder / 'manifest.json'}: tokenizer file {file!r} is not one cl tokenize writes")
    return load_tokenizer(str(folder / file))


