"""`cl tokenize` and the shard_stream scenario (streams.tokens): corpora to token shards
and back, the manifest's checks, and windows read from a shard larger than the reader's memory."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.cli.tokenize_command import add_tokenize_parser, tokenize_command
from streams.sources import DatasetNotFoundError
from streams.tokens.format import ShardError, dtype_for
from streams.tokens.shards import TokenShard, documents, iter_documents, open_tokenizer, read_manifest
from streams.tokens.tokenizer import Tokenizer, load_tokenizer
from streams.tokens.windows import ShardWindows, WindowData, shard_stream

ROOT = Path(__file__).resolve().parents[1]

ENGLISH = ("\n\n  \nAlice was beginning to get very tired of sitting by her sister\non the bank.\n"
           "\nSo she was considering in her own mind (as well as she could, for the\nhot day made her feel "
           "very sleepy and stupid).\n \t \n\n"
           "There was nothing so VERY remarkable in that.   \n"
           + "".join(f"\nParagraph {k}: the Rabbit said \"Oh dear! Oh dear! I shall be late!\" {'x' * k}\n"
                     for k in range(40)) + "\nThe end.\n\n")
FRENCH = ("Notre-Dame de Paris — « Ceci tuera cela ». L'été, déjà, ç'était ça.\r\nUne ligne\r\n\r\n"
          + "".join(f"Il y a {k} ans, {k * 'é'} les cloches sonnaient; à la fin: œuvre.\n\n" for k in range(30))
          + "Fin du livre.")


def paragraphs(text: str) -> list[str]:
    """The documents of a text as the module docstring defines them, by a different route."""
    docs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    return docs + (["\n".join(current)] if current else [])


@pytest.fixture
def corpora(tmp_path) -> list[Path]:
    files = [tmp_path / "en.txt", tmp_path / "fr.txt"]
    files[0].write_text(ENGLISH, encoding="utf-8")
    files[1].write_bytes(FRENCH.encode("utf-8"))
    return files


def args(corpora, out, **kw) -> argparse.Namespace:
    """The Namespace `cl tokenize` parses, through its own parser."""
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    add_tokenize_parser(sub)
    argv = ["tokenize", *map(str, corpora), "--out", str(out)]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return sub._name_parser_map["tokenize"].parse_args(argv[1:], argparse.Namespace(command="tokenize"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_shards(out: Path, texts: dict[str, str], decode) -> dict:
    """Every domain's shards decode back to its documents, the last ones in val; the manifest's
    counts and checksums are the files'."""
    m = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(m["dtype"])
    for entry in m["domains"]:
        docs = paragraphs(texts[entry["name"]])
        got = {split: [decode(ids) for ids in documents(out, entry["name"], split)] for split in ("train", "val")}
        assert got["train"] + got["val"] == [d.encode() if isinstance(decode(np.zeros(0)), bytes) else d
                                             for d in docs]
        assert got["train"] and got["val"]  # the tail of whole documents is held out
        for split in ("train", "val"):
            e, bin_ = entry[split], out / entry["name"] / f"{split}.bin"
            tokens = np.fromfile(bin_, dtype=dtype)
            idx = np.load(out / entry["name"] / f"{split}.idx.npy")
            assert idx.dtype == np.int64 and idx[0] == 0 and len(idx) == e["documents"] == len(got[split])
            assert len(tokens) == e["tokens"] and bin_.stat().st_size == e["tokens"] * dtype.itemsize
            assert (tokens[np.r_[idx[1:], len(tokens)] - 1] == m["separator_id"]).all()  # each document ends so
            assert e["sha256"] == sha(bin_) and e["index_sha256"] == sha(out / entry["name"] / f"{split}.idx.npy")
            n_bytes = sum(len(d.encode()) for d in (docs[:len(got["train"])] if split == "train"
                                                   else docs[len(got["train"]):]))
            assert e["bytes"] == n_bytes
    return m


def test_documents_are_paragraphs_read_in_pieces(corpora):
    for f in corpora:
        text = f.read_bytes().decode()
        expected = [d.encode() for d in paragraphs(text)]
        for chunk in (1, 7, 1 << 20):  # a paragraph cut across reads comes out whole
            assert list(iter_documents(f, chunk_bytes=chunk)) == expected
    assert paragraphs(ENGLISH)[0].startswith("Alice") and paragraphs(FRENCH)[0].endswith("Une ligne\r")


def test_trained_bpe_shards_round_trip_ids_and_documents(corpora, tmp_path):
    pytest.importorskip("tokenizers")
    out = tmp_path / "bpe"
    assert tokenize_command(args(corpora, out, train_bpe=True, vocab_size=400, val_fraction=0.1)) == 0
    tok = open_tokenizer(out)
    m = check_shards(out, {"en": ENGLISH, "fr": FRENCH}, tok.decode)
    assert m["vocab_size"] == 400 and m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "bpe-trained"
    assert m["tokenizer"]["sha256"] == sha(out / "tokenizer.json")
    assert m["separator_id"] == tok.tok.token_to_id("<|endoftext|>") == 0
    en = paragraphs(ENGLISH)
    ids = list(documents(out, "en", "train")) + list(documents(out, "en", "val"))
    assert [i.tolist() for i in ids] == [t.tolist() for t in tok.encode([d.encode() for d in en])]
    # The held-out tail holds at least a tenth of the bytes, and is as short as that allows.
    val = m["domains"][0]["val"]
    total = sum(len(d.encode()) for d in en)
    assert val["bytes"] >= 0.1 * total and val["bytes"] - len(en[-val["documents"]].encode()) < 0.1 * total


def test_transformers_tokenizer_folder(corpora, tmp_path):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from streams.tokens.tokenizer import train_bpe

    bpe = train_bpe((d.encode() for d in paragraphs(ENGLISH + FRENCH)), 350)
    folder = tmp_path / "hf-tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token="<|endoftext|>").save_pretrained(folder)
    out = tmp_path / "hf"
    assert tokenize_command(args(corpora, out, tokenizer=folder)) == 0
    m = check_shards(out, {"en": ENGLISH, "fr": FRENCH}, open_tokenizer(out).decode)
    assert m["tokenizer"]["kind"] == "transformers" and m["vocab_size"] == 350 and (out / "tokenizer").is_dir()


def test_byte_shards_round_trip_bytes(corpora, tmp_path):
    out = tmp_path / "bytes"
    tokenize_command(args(corpora, out))  # --tokenizer bytes is the default
    m = check_shards(out, {"en": ENGLISH, "fr": FRENCH}, Tokenizer().decode)
    assert (m["vocab_size"], m["dtype"], m["separator_id"], m["tokenizer"]["file"]) == (256, "uint16", 0, None)
    raw = np.fromfile(out / "fr" / "train.bin", dtype=np.uint16)
    first = paragraphs(FRENCH)[0].encode()
    assert raw[:len(first)].tolist() == list(first) and raw[len(first)] == 0


class WideTokenizer(Tokenizer):
    """Bytes spread over a vocabulary larger than 16 bits: id = 65536 + byte."""

    kind = "wide"

    def __init__(self):
        super().__init__("wide")
        self.vocab_size, self.eos_id = 70000, 69999

    def encode(self, docs):
        return [np.frombuffer(d, np.uint8).astype(np.int64) + 65536 for d in docs]

    def decode(self, ids):
        return (np.asarray(ids) - 65536).astype(np.uint8).tobytes()


def test_dtype_follows_the_vocabulary(corpora, tmp_path, monkeypatch):
    assert (dtype_for(256), dtype_for(65536), dtype_for(65537), dtype_for(200_000)) == \
           ("uint16", "uint16", "uint32", "uint32")
    import streams.tokens.shards as shards

    monkeypatch.setattr(shards, "load_tokenizer", lambda spec: WideTokenizer())
    out = tmp_path / "wide"
    tokenize_command(args(corpora, out, tokenizer="wide"))
    m = check_shards(out, {"en": ENGLISH, "fr": FRENCH}, WideTokenizer().decode)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70000
    stream = shard_stream(str(out), block_size=16)
    assert stream.n_classes == 70000 and stream.transform.describe()["vocab_size"] == 70000
    x, y, _ = next(stream[0].train.batches(4, False))
    assert x.dtype == torch.int64 and int(x.min()) >= 65536 and int(y.max()) <= 69999


def test_rerun_is_a_no_op_changed_input_refused_force_replaces(corpora, tmp_path, capsys):
    out = tmp_path / "s"
    tokenize_command(args(corpora, out))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert tokenize_command(args(corpora, out)) == 0
    assert "nothing done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    corpora[1].write_text(FRENCH + "\n\nUn paragraphe de plus.", encoding="utf-8")
    with pytest.raises(ShardError, match="other inputs.*--force"):
        tokenize_command(args(corpora, out))
    with pytest.raises(ShardError, match="other inputs"):  # other settings too
        tokenize_command(args(corpora[:1], out, val_fraction=0.2))
    assert tokenize_command(args(corpora, out, force=True)) == 0
    check_shards(out, {"en": ENGLISH, "fr": FRENCH + "\n\nUn paragraphe de plus."}, Tokenizer().decode)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not empty"):
        tokenize_command(args(corpora, tmp_path / "busy"))


def test_bad_inputs_are_one_line(corpora, tmp_path):
    with pytest.raises(ShardError, match="not found") as err:
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    with pytest.raises(DatasetNotFoundError, match="corpus no-such-domain not found"):
        tokenize_command(args(["no-such-domain"], tmp_path / "x", data_dir=tmp_path))
    (tmp_path / "one.txt").write_text("a single paragraph\nof two lines\n")
    with pytest.raises(ShardError, match="at least 2"):
        tokenize_command(args([tmp_path / "one.txt"], tmp_path / "x"))
    with pytest.raises(ShardError, match="--vocab-size"):
        tokenize_command(args(corpora, tmp_path / "x", train_bpe=True))
    assert "\n" not in str(err.value)


def corrupt_cases(out: Path):
    """(change to the folder, error class, text the one-line error holds)."""
    bin_ = out / "en" / "train.bin"

    def truncate():
        with open(bin_, "r+b") as f:
            f.truncate(bin_.stat().st_size - 2)

    def flip():
        data = bytearray(bin_.read_bytes())
        data[10] ^= 1
        bin_.write_bytes(bytes(data))

    def manifest(change):
        def edit():
            m = json.loads((out / "manifest.json").read_text())
            change(m)
            (out / "manifest.json").write_text(json.dumps(m))
        return edit

    return [
        (truncate, ShardError, f"{bin_}: .* bytes, but the manifest says"),
        (flip, ShardError, f"{bin_}: sha256 differs"),
        (lambda: (out / "fr" / "val.bin").unlink(), DatasetNotFoundError, "val.bin not found"),
        (lambda: (out / "en" / "val.idx.npy").write_bytes(b"junk"), ShardError, "val.idx.npy: not a document index"),
        (manifest(lambda m: m.update(dtype="float32")), ShardError, "dtype 'float32'"),
        (manifest(lambda m: m["domains"][0].update(name="../../etc")), ShardError, "not a plain name"),
        (manifest(lambda m: m["domains"][1].update(name="a/b")), ShardError, "not a plain name"),
        (lambda: (out / "manifest.json").write_text("{"), ShardError, "manifest.json: not valid JSON"),
        (lambda: (out / "manifest.json").unlink(), DatasetNotFoundError, "manifest.json not found"),
    ]


def test_damaged_shards_are_refused_with_one_line_naming_the_file(corpora, tmp_path):
    clean = tmp_path / "clean"
    tokenize_command(args(corpora, clean))
    for k in range(len(corrupt_cases(clean))):
        out = tmp_path / f"case{k}"
        shutil.copytree(clean, out)
        change, kind, text = corrupt_cases(out)[k]
        shard_stream(str(out), block_size=8, verify=True)  # intact: fine
        change()
        with pytest.raises(kind, match=text) as err:
            shard_stream(str(out), block_size=8, verify=True)
        assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match="not a plain name"):
        shard_stream(str(clean), domains=["../clean/en"])
    with pytest.raises(DatasetNotFoundError, match="domain 'de' not in"):
        shard_stream(str(clean), domains=["de"])


def test_window_stream_batches_are_next_token_pairs(corpora, tmp_path, monkeypatch):
    out = tmp_path / "data" / "shards"
    tokenize_command(args(corpora, out, val_fraction=0.2))
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "data"))
    stream = shard_stream("shards", domains=["fr", "en"], block_size=16, stride=4, max_val_tokens=100)  # data root
    assert stream.is_sequence and not stream.class_incremental and stream.input_shape == (16,)
    assert stream.n_classes == 256 and stream.task_classes == [list(range(256))] * 2
    assert [e.task_index for e in stream] == [0, 1] and stream.schedule["domains"] == ["fr", "en"]
    m = read_manifest(out)
    tokens = np.fromfile(out / "fr" / "train.bin", dtype=np.uint16).astype(np.int64)
    train = stream[0].train
    assert isinstance(train, WindowData) and len(train) == (len(tokens) - 17) // 4 + 1
    assert train.x.shape == (len(train), 16) and train.x.dtype == torch.int64
    assert train.y.shape == (len(train), 16) and train.y.dim() == 2
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))  # as batches draws it
    rows = 0
    for x, y, t in train.batches(32, True, torch.Generator().manual_seed(1)):
        assert x.shape[1:] == y.shape[1:] == (16,) and x.dtype == y.dtype == torch.int64 and t.shape == x.shape[:1]
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y, i in zip(x, y, order[rows:rows + len(x)].tolist()):
            assert torch.equal(row_x, torch.from_numpy(tokens[4 * i:4 * i + 16]))
            assert torch.equal(row_y, torch.from_numpy(tokens[4 * i + 1:4 * i + 17]))
        rows += len(x)
    assert rows == len(train) and 4 * (len(train) - 1) + 17 <= len(tokens) < 4 * len(train) + 17
    k = torch.tensor([len(train) - 1, 0, 5])
    assert torch.equal(train.x[k][:, 1:], train.y[k][:, :-1]) and torch.equal(train.y[k][1], torch.from_numpy(tokens[1:17]))
    # Validation windows never overlap; max_val_tokens caps them.
    val = stream.test_sets[0]
    assert len(val) == (100 - 17) // 16 + 1
    # What the trainer does with data: subsets, unions, a task label.
    both = stream.test_all
    assert len(both) == len(val) + len(stream.test_sets[1]) and torch.equal(both.y[len(val):len(val) + 2],
                                                                         stream.test_sets[1].y[:2])
    part = both.subset(torch.tensor([len(both) - 1, 0]))
    assert torch.equal(part.x[0], both.x[len(both) - 1]) and part.with_task(3).t.tolist() == [3, 3]
    assert m["domains"][0]["name"] == "en"


def test_windows_over_a_shard_in_pieces_equal_the_whole_map(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(10_000, dtype=np.uint16).tofile(path)
    whole, pieces = TokenShard(path, "uint16"), TokenShard(path, "uint16", segment_tokens=1000)
    a, b = ShardWindows(whole, 64, 37), ShardWindows(pieces, 64, 37)
    index = np.arange(len(a))[::-1]
    assert torch.equal(a.read(index), b.read(index)) and torch.equal(a.read([26])[0], torch.arange(962, 1027))
    assert pieces[995:1005].tolist() == list(range(995, 1005)) and len(pieces._pieces) <= 4


BIG = """
import os, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from streams.tokens import shard_stream

def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))

stream = shard_stream({folder!r}, block_size=256)
train = stream[0].train
next(stream.test_sets[0].batches(8, True, torch.Generator()))  # warm: the DataLoader's path, once
base = vm()
limit = base + (100 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
path = {folder!r} + "/big/train.bin"
n_tokens = os.path.getsize(path) // 2
fd = os.open(path, os.O_RDONLY)
def expected(start):
    return np.frombuffer(os.pread(fd, 257 * 2, start * 2), dtype=np.uint16).astype(np.int64)
starts = []
for k, (x, y, t) in enumerate(train.batches(512, True, torch.Generator().manual_seed(0))):
    assert x.shape == y.shape == (512, 256) and torch.equal(x[:, 1:], y[:, :-1])
    if k == 30:
        break
ends = torch.tensor([0, len(train) // 2, len(train) - 1])
for i, row, target in zip(ends.tolist(), train.x[ends], train.y[ends]):
    want = expected(i * 256)
    assert row.tolist() == want[:-1].tolist() and target.tolist() == want[1:].tolist()
spread = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:2000]
lo, hi = int(spread.min()), int(spread.max())
assert lo < len(train) // 10 and hi > len(train) * 9 // 10
x = train.x[spread]
assert all(x[j].tolist() == expected(int(i) * 256)[:-1].tolist() for j, i in enumerate(spread[:50]))
try:
    np.fromfile(path, dtype=np.uint16)
except MemoryError:
    print("OK", base, limit, n_tokens, vm(), train.dataset.shard.segment_tokens or 0)
else:
    print("READ WHOLE")
"""


def test_windows_of_a_shard_larger_than_the_memory_limit(tmp_path):
    """A 300 MB shard read by a process allowed 100 MB beyond what it has at the start: windows
    from all over it come, reading the file whole does not fit."""
    folder = tmp_path / "big-shards"
    (folder / "big").mkdir(parents=True)
    n = 150_000_000
    rng = np.random.default_rng(0)
    train = np.memmap(folder / "big" / "train.bin", dtype=np.uint16, mode="w+", shape=(n,))
    for a in range(0, n, 1 << 24):
        train[a:a + (1 << 24)] = rng.integers(0, 50257, size=min(1 << 24, n - a), dtype=np.uint16)
    train.flush()
    del train
    np.arange(5000, dtype=np.uint16).tofile(folder / "big" / "val.bin")
    for split in ("train", "val"):
        np.save(folder / "big" / f"{split}.idx.npy", np.zeros(1, dtype=np.int64))
    manifest = {"format": "cl-token-shards", "version": 1, "vocab_size": 50257, "dtype": "uint16",
                "separator_id": 50256, "tokenizer": {"name": "random", "kind": "test", "sha256": None},
                "domains": [{"name": "big", "train": {"tokens": n, "documents": 1, "bytes": 0},
                             "val": {"tokens": 5000, "documents": 1, "bytes": 0}}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    script = BIG.format(root=str(ROOT), folder=str(folder))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                              env=env, timeout=120)
    finally:
        (folder / "big" / "train.bin").unlink()  # 300 MB: not left in pytest's kept folders
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr[-3000:]
    base, limit, tokens, end, pieces = map(int, done.stdout.split()[1:])
    assert tokens * 2 > limit - base + (150 << 20)  # the shard is larger than the room it was read in
    assert 0 < pieces * 2 * 4 < limit - base  # mapped a few pieces at a time, the whole map refused


def test_a_tracked_run_fingerprints_shard_windows_without_reading_their_targets(corpora, tmp_path, monkeypatch):
    from cl.tracking.provenance import dataset_inputs, digest
    from streams.tokens.windows import WindowTargets

    out = tmp_path / "shards"
    tokenize_command(args(corpora, out))
    stream = shard_stream(str(out), block_size=16)
    monkeypatch.setattr(WindowTargets, "__getitem__", lambda *a: pytest.fail("read every target to fingerprint"))
    first, again = digest(stream[0].train), digest(shard_stream(str(out), block_size=16)[0].train)
    assert first == again and first != digest(stream[1].train) != digest(stream[0].train.subset(slice(0, 3)))
    profiles = dataset_inputs(stream, "shards", str(tmp_path))
    assert profiles[0]["profile"]["classes"] == list(range(256))  # a byte vocabulary is listed; 50k ids would not be
    # The loss per byte divides each domain's loss by its validation text's bytes per token.
    m = read_manifest(out)
    assert stream.schedule["bytes_per_token"] == [m["by_name"][d]["val"]["bytes"] / m["by_name"][d]["val"]["tokens"]
                                                  for d in stream.schedule["domains"]]


def test_a_corpus_of_one_paragraph_a_line_is_read_line_by_line(tmp_path):
    # French Wikipedia extracts (the lab's wiki-fr-extract.txt) hold no blank line: by paragraphs
    # the file is one document, which leaves nothing to validate on; by lines each is one.
    text = "Anubis\nAnubis est un dieu funéraire.\n\nOsiris\nOsiris est le dieu des morts.\n"
    corpus = tmp_path / "wiki.txt"
    corpus.write_text(text.replace("\n\n", "\n"), encoding="utf-8")
    with pytest.raises(ShardError, match="1 document"):
        tokenize_command(args([corpus], tmp_path / "by_paragraph"))
    out = tmp_path / "by_line"
    tokenize_command(args([corpus], out, documents="lines", val_fraction=0.3))
    got = [bytes(ids.astype(np.uint8)).decode() for split in ("train", "val") for ids in documents(out, "wiki", split)]
    assert got == [line for line in text.splitlines() if line.strip()]
    assert read_manifest(out)["inputs"]["documents"] == "lines"
    assert tokenize_command(args([corpus], out, documents="lines", val_fraction=0.3)) == 0  # unchanged: no-op
    with pytest.raises(ShardError, match="--force"):  # another cut of the same file is another input
        tokenize_command(args([corpus], out, documents="lines", val_fraction=0.5))


def test_the_bpe_rewarming_study_file_is_valid_and_reads_shards_the_way_cl_tokenize_writes_them(tmp_path):
    from cl.config.components import build_stream
    from cl.config.files import load_experiment

    study = ROOT / "experiments" / "lm" / "rewarming_bpe.yaml"
    domains = ["tiny-shakespeare", "wonderland", "wiki-fr-extract", "nottingham-jigs"]
    (tmp_path / "text").mkdir()
    for k, name in enumerate(domains):  # one paragraph a line, as --documents lines reads it
        (tmp_path / "text" / f"{name}.txt").write_text("".join(f"line {i} of domain {k} says {'ab' * k}\n"
                                                               for i in range(400)))
    tokenize_command(args(domains, tmp_path / "tokenized" / "bpe4096", documents="lines", val_fraction=0.1,
                          data_dir=tmp_path))
    cfg = load_experiment(study, [f"data_dir={tmp_path}", "stream.scenario.max_val_tokens=256"])
    stream = build_stream(cfg)
    assert len(stream) == 4 and stream.schedule["domains"] == domains and stream.input_shape == (128,)
    assert set(cfg.runs) == {"constant", "rewarm", "rewarm_replay5", "rewarm_replay1", "rewarm_replay25",
                             "infinite_replay5", "joint"}
