"""A name is never a path (issue 24): run labels, experiment names and sweep names become file
names through `cl.config.names.file_name` only, so whatever a file calls its runs, the lab
writes inside the folders it was given, replaces no file it did not write, and gives distinct
names distinct files."""
import hashlib
import random
import re
from pathlib import Path

import pytest
import torch

from cl.cli.main import main
from cl.config.names import MAX_LENGTH, file_name

from conftest import tiny_experiment

#: Names that a naive `f"{name}.pt"` turns into another folder, another file, or one file for two names.
HOSTILE = ["/some/where/victim", "../../x", "..", ".", "", "a/b", "a\\b", "a_b", "a:b", "a b", "a\x00b",
           "a\nb", "\x1b[31mred", "Re\u202eplay", "x" * 1000, "replay", "Replay", "REPLAY", "-rf", ".hidden",
           "nul", "parent", "cdb4ee2aea", "x-" + "0" * 10, "é", "e\u0301", "日本"]


def generated_names(n: int, seed: int = 0) -> list[str]:
    """`n` random strings over the characters that break paths, with letters between them."""
    rng = random.Random(seed)
    alphabet = list("/\\..:-_ aAzZ09") + ["\x00", "\x01", "\x1f", "\x7f", "\u0085", "\u2028", "\u202e", "é", "\ud800"]
    return [("".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 5, 30, 200]))))
            for _ in range(n)]


def snapshot(root: Path) -> dict[Path, str]:
    """Every file under `root` and the hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def plant(tmp_path: Path) -> Path:
    """Files the lab did not write, where naive names would land: beside and above the folders
    the commands are given, at an absolute label's path."""
    for rel in ("victim.pt", "x.pt", "planted.pt", "ck/notes.txt", "some/where/victim.pt", "work/..pt",
                "cl-journal/keep.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"not the lab's: {rel}")
    return tmp_path


def check_untouched_and_inside(before: dict[Path, str], after: dict[Path, str], *allowed: Path) -> list[Path]:
    """No file that was there changed or went; every new file lies under `allowed`; the new files."""
    assert {p: h for p, h in after.items() if p in before} == before
    new = sorted(set(after) - set(before))
    outside = [p for p in new if not any(p.is_relative_to(a) for a in allowed)]
    assert not outside, outside
    return new


# ------------------------------------------------------------ the function
def test_file_names_are_safe_bounded_deterministic_and_distinct():
    names = list(dict.fromkeys(HOSTILE + generated_names(2000)))
    mapped = [file_name(n) for n in names]
    for name, out in zip(names, mapped):
        assert 1 <= len(out) <= MAX_LENGTH <= 80, (name, out)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", out), (name, out)  # no separator, NUL, control, leading dot/dash
        assert out not in (".", "..") and not out.endswith(".")
        assert file_name(name) == out  # deterministic
    assert len(set(mapped)) == len(names)  # distinct names, distinct files
    assert len({m.casefold() for m in mapped}) == len(names)  # on a case-insensitive file system too


def test_plain_names_keep_their_file_names():
    for name in ("replay", "replay-seed0", "trial3-naive-seed1", "tiny-abcd1234", "ewc_on.1"):
        assert file_name(name) == name
    assert file_name("Replay").startswith("Replay-") and file_name("../../x").startswith("x-")
    assert file_name("parent", reserved=("parent",)) != "parent"
    assert file_name("x" * 1000) != file_name("x" * 999)  # the cut-off prefix is not the whole name


# ------------------------------------------------------------ through the command
def test_hostile_run_labels_stay_in_the_checkpoint_folder(tmp_path, monkeypatch, capsys):
    """Generated hostile labels, over two seeds, as a user's file gives them: every checkpoint is
    a distinct file in the folder given, and no file around it changes."""
    root = plant(tmp_path)
    monkeypatch.chdir(root / "work")
    generated = [n for n in generated_names(6, seed=1) if "\ud800" not in n]  # a lone surrogate prints nowhere
    labels = list(dict.fromkeys(HOSTILE + [str(root / "planted"), "../planted"] + generated))
    file = tiny_experiment(root / "work", name="../../exp\x00/..", n_experiences=2, strategies=None, seeds=[0, 1],
                           runs={label: ["naive"] for label in labels})
    before = snapshot(root)
    assert main(["run", str(file), "--checkpoint-dir", "ck", "--no-track", "--no-progress"]) == 0
    new = check_untouched_and_inside(before, snapshot(root), root / "work" / "ck")
    checkpoints = [p for p in new if p.suffix == ".pt"]
    assert len(checkpoints) == len(new) == 2 * len(labels)  # one per label and seed, nothing else
    assert all(p.parent == root / "work" / "ck" for p in checkpoints)


def test_hostile_names_tracked_stay_in_their_folders(tmp_path, monkeypatch, journal_dir):
    """Tracked, with journals beside the checkpoints: a label `parent` is not the parent's journal,
    labels differing by case or by unsafe characters get journals of their own."""
    root = plant(tmp_path)
    monkeypatch.chdir(root / "work")
    labels = ["parent", "Replay", "replay", "re/play", "re_play", "../../x", "a\x00b"]
    file = tiny_experiment(root / "work", name="/abs/../exp\x1b", n_experiences=2, strategies=None,
                           runs={label: ["naive"] for label in labels})
    before = snapshot(root)
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    assert main(["run", str(file), "--checkpoint-dir", "ck", "--tracking-uri", uri, "--no-progress"]) == 0
    new = check_untouched_and_inside(before, snapshot(root), root / "work" / "ck", root / "store", journal_dir)
    ck = root / "work" / "ck"
    assert len({p for p in new if p.parent == ck and p.suffix == ".pt"}) == len(labels)
    journals = {p.name for p in ck.iterdir() if p.suffix == ".journal"}
    assert len(journals) == len(labels) + 1 and "parent.journal" in journals


def test_hostile_sweep_name_stays_in_the_journal_folder(tmp_path, monkeypatch, journal_dir):
    """The sweep's parent journal and its trials' share one folder under the journal root,
    whatever the sweep is called (kept here, not removed once delivered, to be looked at)."""
    root = plant(tmp_path)
    monkeypatch.chdir(root / "work")
    monkeypatch.setattr("cl.tracking.journal.Journal.remove", lambda self: self.close())
    file = tiny_experiment(root / "work", "sweep.yaml", name="../../sweep/../..", n_experiences=2, threads=1,
                           sweep={"parameters": {"training.optimizer.lr": [0.05]}, "final_run": False})
    before = snapshot(root)
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    assert main(["sweep", str(file), "--no-ray", "--tracking-uri", uri]) == 0
    check_untouched_and_inside(before, snapshot(root), root / "store", journal_dir)
    folders = {p.parent for p in journal_dir.rglob("*.journal")}
    assert len(folders) == 1 and folders.pop().parent == journal_dir
    assert {p.name for p in journal_dir.rglob("*.journal")} == {"parent.journal", "trial0-naive.journal"}


def test_an_absolute_label_never_touches_the_file_it_names(tmp_path, monkeypatch):
    """The issue's case: `runs: {"/some/where/victim": [naive]}` with `--checkpoint-dir ck` wrote
    /some/where/victim.pt, replacing whatever was there."""
    victim = tmp_path / "some" / "where" / "victim.pt"
    victim.parent.mkdir(parents=True)
    victim.write_text("someone's file")
    monkeypatch.chdir(tmp_path)
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=None,
                           runs={str(victim.with_suffix("")): ["naive"]})
    assert main(["run", str(file), "--checkpoint-dir", "ck", "--no-track", "--no-progress"]) == 0
    assert victim.read_text() == "someone's file"
    assert len(list((tmp_path / "ck").glob("*.pt"))) == 1


@pytest.mark.parametrize("resume", [False, True])
def test_a_file_the_lab_did_not_write_is_refused_not_replaced(tmp_path, monkeypatch, capsys, resume):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "ck" / "replay.pt"
    mine.parent.mkdir()
    torch.save({"weights": torch.zeros(2)}, mine)  # a torch file, not a checkpoint of the lab
    before = mine.read_bytes()
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=None, runs={"replay": ["naive"]})
    code = main(["run", str(file), "--checkpoint-dir", "ck", "--no-track", "--no-progress"]
                + (["--resume"] if resume else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and mine.read_bytes() == before
    assert str(Path("ck") / "replay.pt") in err[-1] and len(err) == 1


def test_a_lab_checkpoint_is_still_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=None, runs={"replay": ["naive"]})
    for _ in range(2):  # the second run replaces the first's checkpoint, as before
        assert main(["run", str(file), "--checkpoint-dir", "ck", "--no-track", "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["replay.pt"]


def test_a_folder_the_lab_did_not_write_is_not_taken_for_a_journal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "ck" / "replay.journal"
    mine.parent.mkdir()
    mine.write_text("my notes")
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=None, runs={"replay": ["naive"]})
    code = main(["run", str(file), "--checkpoint-dir", "ck", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and mine.read_text() == "my notes"
    assert str(Path("ck") / "replay.journal") in err[-1] and "not a journal the lab wrote" in err[-1]
