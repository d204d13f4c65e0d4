"""Tokenizers for `cl tokenize`: the 256 bytes, a Hugging Face `tokenizers` file, a
`transformers` tokenizer folder or hub id, and a byte-level BPE trained on the corpora."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from streams.tokens.format import BYTE_SEPARATOR, EOS_NAMES, ShardError, _sha256_file, _sha256_folder

# ---------------------------------------------------------------------------------- tokenizers

class Tokenizer:
    """A tokenizer as the shards need it: `encode` a batch of documents (bytes), `decode` ids,
    its vocabulary size and separator, and where its copy in a shard folder comes from."""

    kind = "bytes"

    def __init__(self, name: str = "bytes"):
        self.name = name
        self.vocab_size = 256
        self.eos_id: int | None = BYTE_SEPARATOR
        self.eos_token: str | None = None

    def encode(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(d, dtype=np.uint8) for d in documents]

    def decode(self, ids) -> bytes:
        return np.asarray(ids, dtype=np.uint8).tobytes()

    def save(self, folder: Path) -> str | None:
        """Write a copy into `folder`; the name of what was written (relative), or None."""
        return None

    def sha256(self) -> str:
        return hashlib.sha256(b"bytes:256").hexdigest()


def _text(documents: Sequence[bytes]) -> list[str]:
    try:
        return [d.decode("utf-8") for d in documents]
    except UnicodeDecodeError as err:
        raise ShardError(f"a document is not UTF-8 text ({err.reason} at byte {err.start} of it); "
                         f"use --tokenizer bytes for binary text") from None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a tokenizer.json file, or a BPE trained here)."""

    kind = "tokenizer.json"

    def __init__(self, tokenizer, name: str, source: Path | None = None):
        self.tok, self.name, self.source = tokenizer, name, source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.eos_token = None, None
        for token in EOS_NAMES:
            if tokenizer.token_to_id(token) is not None:
                self.eos_id, self.eos_token = tokenizer.token_to_id(token), token
                break

    def encode(self, documents):
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.tok.encode_batch(_text(documents), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: Path) -> str:
        self.tok.save(str(folder / "tokenizer.json"))
        return "tokenizer.json"

    def sha256(self) -> str:
        if self.source is not None:
            return _sha256_file(self.source)
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()


class TransformersTokenizer(Tokenizer):
    """A transformers tokenizer: a local folder (`save_pretrained`) or a hub id."""

    kind = "transformers"

    def __init__(self, tokenizer, name: str):
        self.tok, self.name = tokenizer, name
        self.vocab_size = len(tokenizer)
        self.eos_id, self.eos_token = tokenizer.eos_token_id, tokenizer.eos_token
        self._saved: Path | None = None

    def encode(self, documents):
        ids = self.tok(_text(documents), add_special_tokens=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)

    def save(self, folder: Path) -> str:
        self.tok.save_pretrained(str(folder / "tokenizer"))
        self._saved = folder / "tokenizer"
        return "tokenizer"

    def sha256(self) -> str:
        """Of the files `save_pretrained` writes (the tokenizer as it is used, wherever it came from)."""
        import tempfile

        if self._saved is not None:
            return _sha256_folder(self._saved)
        with tempfile.TemporaryDirectory() as tmp:
            self.tok.save_pretrained(tmp)
            return _sha256_folder(Path(tmp))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`bytes`; a tokenizer.json file; a folder holding a transformers tokenizer (or only a
    tokenizer.json); else a Hugging Face hub id, downloaded by transformers."""
    spec = str(spec)
    if spec == "bytes":
        return Tokenizer()
    path = Path(spec).expanduser()
    if path.is_file() or path.is_dir() and (path / "tokenizer.json").is_file() \
            and not (path / "tokenizer_config.json").is_file():
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise ShardError("reading a tokenizer.json needs the `tokenizers` package: pip install tokenizers") from None
        try:
            return HFTokenizer(_Tok.from_file(str(file)), spec, file)
        except Exception as err:
            raise ShardError(f"{file}: not a tokenizers tokenizer.json ({_first_line(err)})") from None
    looks_local = path.is_dir() or spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1
    if not path.exists() and looks_local:
        raise ShardError(f"tokenizer {spec} not found: give a tokenizer.json file, a tokenizer folder, a "
                         f"Hugging Face hub id, or `bytes`")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ShardError(f"tokenizer {spec}: a transformers tokenizer needs the `transformers` package: "
                         f"pip install transformers") from None
    try:
        if path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            tok = _from_hub(AutoTokenizer, spec)
    except ShardError:
        raise
    except Exception as err:
        where = "the folder" if path.is_dir() else "the Hugging Face hub id (is the hub reachable?)"
        raise ShardError(f"tokenizer {spec}: cannot load {where}: {_first_line(err)}") from None
    return TransformersTokenizer(tok, spec)


def _from_hub(auto, spec: str):
    """A hub tokenizer: from the local cache if there, else downloaded; where the hub cannot be
    reached at all, one line at once (not a minute of retries)."""
    import socket
    from urllib.parse import urlparse

    try:
        return auto.from_pretrained(spec, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ShardError(f"tokenizer {spec}: not in the Hugging Face cache, and HF_HUB_OFFLINE forbids downloading it")
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise ShardError(f"tokenizer {spec}: not a file or folder here, and the Hugging Face hub ({host}) cannot "
                         f"be reached to download it ({err.strerror or err}); give a local tokenizer.json or "
                         f"folder, or `bytes`") from None
    return auto.from_pretrained(spec)


def train_bpe(documents: Iterable[bytes], vocab_size: int, eos: str = "<|endoftext|>") -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme: every byte has a token, so any text encodes) of
    `vocab_size` tokens, `eos` its id 0, trained with `tokenizers` on the documents."""
    try:
        from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ShardError("--train-bpe needs the `tokenizers` package: pip install tokenizers") from None
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ShardError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs at least "
                         f"{len(alphabet) + 1} (256 bytes and the end-of-text token)")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in documents), trainer=trainer)
    return HFTokenizer(tok, f"bpe-{vocab_size}")
