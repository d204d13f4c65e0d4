"""`cl tokenize`: text corpora to token shards for continual pre-training (`streams.tokens`).

    cl tokenize CORPUS... --tokenizer T --out DIR [--val-fraction 0.005]
                [--train-bpe --vocab-size N] [--separator-id ID] [--force]

Each CORPUS (a text file, or a `text/<domain>.txt` name under the data root) is a domain:
DIR/<domain>/train.bin and val.bin, their document indexes, and DIR/manifest.json. The
same command again is a no-op; other inputs into the same DIR are refused unless --force.
A scenario reads the folder back: `shard_stream` (stream.scenario.shards: DIR).
"""
from __future__ import annotations

import argparse


def add_tokenize_parser(subparsers) -> argparse.ArgumentParser:
    """Declare `cl tokenize` on the `cl` command's subparsers; returns its parser."""
    p = subparsers.add_parser("tokenize", help="tokenize text corpora into token shards (one domain each) for "
                                               "continual pre-training: the shard_stream scenario reads them")
    p.add_argument("corpora", nargs="+", metavar="CORPUS",
                   help="a text file, or a name under the data root (text/<domain>.txt); documents are its "
                        "paragraphs (separated by blank lines), the last ones held out for validation")
    p.add_argument("--tokenizer", default="bytes", metavar="T",
                   help="a tokenizer.json file, a local transformers tokenizer folder, a Hugging Face hub id, or "
                        "`bytes` (the 256 byte values; the default)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write the shards and manifest.json to")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="the share of each corpus's bytes held out for validation: its last documents "
                        "(default 0.005)")
    p.add_argument("--train-bpe", action="store_true",
                   help="train a byte-level BPE of --vocab-size tokens on the corpora first (saved as "
                        "DIR/tokenizer.json); --tokenizer is then ignored")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N", help="the size of the BPE --train-bpe trains")
    p.add_argument("--separator-id", type=int, default=None, metavar="ID",
                   help="the token id between documents (default: the tokenizer's end-of-text token; 0 for bytes)")
    p.add_argument("--data-dir", default=None, help="the data root for corpus names (default: CL_DATA_DIR)")
    p.add_argument("--force", action="store_true", help="replace shards of other inputs already in DIR")
    p.add_argument("--documents", choices=("paragraphs", "lines"), default="paragraphs",
                   help="what a document is: paragraphs (separated by blank lines; the default) or every "
                        "non-blank line (corpora of one paragraph a line, such as Wikipedia extracts)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def tokenize_command(args) -> int:
    """Run `cl tokenize`; failures raise (ShardError is a ValueError, a missing corpus a
    DatasetNotFoundError): `cl.cli.main` prints them as one line, exit code 2."""
    import json

    from streams.tokens import tokenize_corpora

    quiet = getattr(args, "json", False)
    manifest = tokenize_corpora(args.corpora, tokenizer=args.tokenizer, out=args.out,
                                val_fraction=args.val_fraction, vocab_size=args.vocab_size,
                                train=args.train_bpe, separator_id=args.separator_id, force=args.force,
                                data_dir=getattr(args, "data_dir", None),
                                documents=getattr(args, "documents", "paragraphs"),
                                log=(lambda line: None) if quiet else print)
    if quiet:
        manifest.pop("by_name", None)
        print(json.dumps(manifest, indent=1))
        return 0
    total = sum(d[s]["tokens"] for d in manifest["domains"] for s in ("train", "val"))
    state = "already up to date (same inputs): nothing done" if manifest["status"] == "unchanged" else "written"
    print(f"{args.out}: {len(manifest['domains'])} domain(s), {total:,} tokens of vocabulary "
          f"{manifest['vocab_size']:,} ({manifest['dtype']}), {state}")
    return 0
