"""Token shards: corpora tokenized once to flat binary files, read as windows on demand.

`cl tokenize` (`tokenize_corpora`) turns text corpora into shards for continual
pre-training of real language models; `shard_stream` reads them back as a stream
of one experience per corpus (a domain), like `token_stream` but with any Hugging
Face tokenizer (or the 256 bytes), and without holding a corpus in memory.

Documents. A corpus is a UTF-8 text file; its documents are its paragraphs: maximal
runs of lines that are not blank (a blank line is empty or whitespace only); or, with
`--documents lines`, its non-blank lines (a Wikipedia extract holds one paragraph a line). A
document's text is its lines joined by "\\n", without the blank lines around it
("\\r" at a line's end stays in the text). The held-out validation part of a domain
is the last documents of its file: the shortest tail of whole documents that holds
at least `val_fraction` of the domain's document bytes (at least one document, and
at least one left for training), so that nothing of it leaks into training.

The folder `cl tokenize` writes (the manifest is written last, once the shards are
complete; file names are fixed, never read from the manifest)::

    DIR/manifest.json                   tokenizer, vocabulary, dtype, counts, checksums
    DIR/tokenizer.json | DIR/tokenizer/ a copy of the tokenizer (none for `bytes`)
    DIR/<domain>/train.bin, val.bin     the token ids, one after another, as raw
                                        uint16 (vocabulary <= 65536) or uint32
    DIR/<domain>/train.idx.npy, ...     int64: the offset of every document's first token

Every document is followed by the separator id (the tokenizer's end-of-text token,
or `--separator-id`; byte shards use 0, the NUL byte, outside the text): document k
is `tokens[idx[k]:idx[k+1] - 1]`. `bytes` in the manifest counts the UTF-8 bytes of
a split's documents (not the blank lines between them), for bits per byte.
"""

from streams.tokens.format import ShardError, dtype_for
from streams.tokens.shards import (TokenShard, bytes_per_token, documents, open_tokenizer, read_manifest,
                                   tokenize_corpora)
from streams.tokens.tokenizer import load_tokenizer, train_bpe
from streams.tokens.windows import ShardWindows, WindowData, shard_stream

__all__ = ["ShardError", "ShardWindows", "TokenShard", "WindowData", "bytes_per_token", "documents", "dtype_for",
           "load_tokenizer", "open_tokenizer", "read_manifest", "shard_stream", "tokenize_corpora", "train_bpe"]
