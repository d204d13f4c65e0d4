"""A journal is data (issue 24): `cl sync` on a journal that is corrupt, holds records of the
wrong shape, names a store of its own, or names files outside its folder loses no valid
record, delivers only to the store the user names, reads nothing outside the journal's
folder, and says what it passed over in a few one-line messages."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from conftest import tiny_experiment

SECRET = b"a file outside the journal: never to be read"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def journals(tmp_path_factory) -> Path:
    """The journals a real tiny run leaves behind when its store never answers: one
    invocation's folder holding parent.journal and naive.journal, every record pending."""
    tmp = tmp_path_factory.mktemp("run")
    path = tiny_experiment(tmp, name="trust-test", threads=1, hidden=(8,), n_experiences=2)
    env = {**os.environ, "CL_JOURNAL_DIR": str(tmp / "j")}
    proc = subprocess.run([sys.executable, "-m", "cl", "run", str(path), "--no-progress", "--tracking-uri",
                           f"http://127.0.0.1:{_free_port()}", "--tracking-timeout", "0.3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (invocation,) = (tmp / "j").iterdir()
    assert sorted(p.name for p in invocation.iterdir()) == ["naive.journal", "parent.journal"]
    return invocation


@pytest.fixture
def case(journals, tmp_path):
    """A copy of the journals, a store for the user, a foreign store, a secret outside."""
    root = tmp_path / "journals"
    shutil.copytree(journals, root / journals.name)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    return root / journals.name, f"sqlite:///{tmp_path / 'store' / 'user.db'}", tmp_path / "foreign" / "foreign.db", \
        outside


def lines(journal: Path) -> list[bytes]:
    return (journal / "records.jsonl").read_bytes().splitlines(keepends=True)


def write(journal: Path, content: list[bytes]) -> None:
    (journal / "records.jsonl").write_bytes(b"".join(content))


def record(op: str, **fields) -> bytes:
    return json.dumps({"op": op, "time": 1, **fields}).encode() + b"\n"


def valid_points(journal: Path) -> set[tuple[str, int]]:
    """The metric points of the journal's whole, well-formed metric lines."""
    points = set()
    for line in lines(journal):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if line.endswith(b"\n") and isinstance(r, dict) and r.get("op") == "metrics" and \
                isinstance(r.get("metrics"), dict) and type(r.get("step")) is int:
            points |= {(k, r["step"]) for k in r["metrics"]}
    return points


def store_runs(uri: str) -> dict:
    """{role: (status, {(key, step)}, run)} of the experiment's runs in the store."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("trust-test")
    out = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        points = {(k, m.step) for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)}
        out[run.data.tags.get("cl.role", "child")] = (run.info.status, points, run)
    return out


def sync(capsys, *args) -> tuple[int, str]:
    code = main(["sync", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def no_secret_in(folder: Path) -> bool:
    return not any(SECRET in p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_a_corrupt_line_in_the_middle_loses_nothing_after_it(case, capsys):
    invocation, uri, _, _ = case
    child = invocation / "naive.journal"
    content = lines(child)
    expected = valid_points(child)
    content.insert(3, b'{"op": "metrics", "metr\xff garbage\n')
    write(child, content)
    code, err = sync(capsys, invocation, "--tracking-uri", uri)
    runs = store_runs(uri)
    assert runs["child"][0] == "FINISHED" and runs["parent"][0] == "FINISHED"
    assert expected <= runs["child"][1]  # every metric, those after the bad line included
    assert code == 1 and "1 line(s) that are not records passed over" in err
    kept = [json.loads(x) for x in (child / "records.corrupt.jsonl").read_text().splitlines()]
    assert [k["line"] for k in kept] == [4] and "garbage" in kept[0]["text"]
    assert lines(child)[3].startswith(b'{"op": "metrics", "metr')  # the journal is left whole, nothing cut


def test_a_torn_last_line_is_still_repaired(case, capsys):
    invocation, uri, _, _ = case
    child = invocation / "naive.journal"
    whole = lines(child)
    write(child, whole + [b'{"op": "metrics", "metrics": {"acc": 0.'])
    code, err = sync(capsys, invocation, "--tracking-uri", uri)
    assert code == 0, err
    assert store_runs(uri)["child"][0] == "FINISHED"


def test_a_journal_that_cannot_be_read_is_named_and_left_as_it_is(case, capsys):
    invocation, uri, _, _ = case
    child = invocation / "naive.journal"
    (child / "state.json").write_text("{not json")
    before = sorted(p.name for p in child.iterdir())
    code, err = sync(capsys, invocation, "--tracking-uri", uri)
    assert code == 1
    named = [line for line in err.splitlines() if str(child) in line]
    assert len(named) == 1 and "cannot be read" in named[0] and "state.json" in named[0], err
    assert sorted(p.name for p in child.iterdir()) == before  # nothing deleted
    assert store_runs(uri)["parent"][0] == "FINISHED"  # the other journal delivered


@pytest.mark.parametrize("given", ["environment", "option"])
def test_the_store_a_journal_names_is_never_used(case, capsys, monkeypatch, given):
    invocation, uri, foreign, _ = case
    for journal in invocation.iterdir():
        content = lines(journal)
        create = json.loads(content[0])
        create["tracking_uri"] = f"sqlite:///{foreign}"
        content[0] = json.dumps(create).encode() + b"\n"
        write(journal, content)
    if given == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        code, err = sync(capsys, invocation)
    else:
        code, err = sync(capsys, invocation, "--tracking-uri", uri)
    assert code == 0, err
    assert not foreign.parent.exists()
    assert store_runs(uri)["child"][0] == "FINISHED"


def test_an_artifact_outside_the_journal_is_refused_and_delivery_goes_on(case, capsys):
    invocation, uri, _, outside = case
    child = invocation / "naive.journal"
    (child / "blobs" / "link").mkdir(parents=True)
    (child / "blobs" / "link" / "secret.txt").symlink_to(outside / "secret.txt")
    (child / "blobs" / "dirlink").symlink_to(outside)
    content = lines(child)
    bad = [str(outside / "secret.txt"), "../../../outside/secret.txt", "blobs/link/secret.txt", "blobs/dirlink",
           "blobs/link"]
    content[2:2] = [record("artifact", path=p) for p in bad]
    write(child, content)
    code, err = sync(capsys, invocation, "--tracking-uri", uri)
    runs = store_runs(uri)
    assert runs["child"][0] == "FINISHED"
    client = MlflowClient(uri)
    assert "accuracy_matrix.png" in {a.path for a in client.list_artifacts(runs["child"][2].info.run_id)}
    assert no_secret_in(Path(uri[len("sqlite:///"):]).parent)
    assert code == 1


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"42\n", b'"text"\n', b"null\n", b'{"op": 5}\n', b'{"time": 1}\n',
                                  b'{"op": "metrics", "time": 1, "metrics": [1], "step": "x"}\n',
                                  b'{"op": "tags", "time": 1, "tags": ["a"]}\n', b'{"op": "end", "time": 1}\n'])
def test_a_record_that_is_not_an_object_of_its_kind_is_passed_over(case, capsys, line):
    invocation, uri, _, _ = case
    child = invocation / "naive.journal"
    expected = valid_points(child)
    content = lines(child)
    content.insert(2, line)
    write(child, content)
    code, err = sync(capsys, invocation, "--tracking-uri", uri)
    runs = store_runs(uri)
    assert runs["child"][0] == "FINISHED" and expected <= runs["child"][1]
    assert code == 1 and (child / "records.corrupt.jsonl").exists()


WRONG = [b"[1, 2]\n", b"42\n", b"null\n", b'{"op": []}\n', b'{"op": "metrics", "time": 1, "metrics": 3, "step": 1}\n',
         b'{"op": "artifact", "time": 1, "path": 7}\n', b'{"op": "create", "time": 1}\n', b"\xff\xfe\n", b"{\n"]


def _is_end(line: bytes) -> bool:
    try:
        r = json.loads(line)
    except ValueError:
        return False
    return line.endswith(b"\n") and isinstance(r, dict) and r.get("op") == "end" and isinstance(r.get("status"), str)


def test_fuzzed_journals_lose_no_valid_record_and_stay_inside(journals, tmp_path, capsys):
    rng = random.Random(24)
    for n in range(20):
        folder = tmp_path / f"case{n}"
        invocation = folder / "journals" / journals.name
        shutil.copytree(journals, invocation)
        outside, foreign = folder / "outside", folder / "foreign" / "foreign.db"
        outside.mkdir()
        (outside / "secret.txt").write_bytes(SECRET)
        uri = f"sqlite:///{folder / 'store' / 'user.db'}"
        for journal in invocation.iterdir():
            content = lines(journal)
            create = json.loads(content[0])
            create["tracking_uri"] = f"sqlite:///{foreign}"
            content[0] = json.dumps(create).encode() + b"\n"
            for _ in range(rng.randint(1, 4)):
                where = rng.randint(1, len(content) - 1)  # after the creation, the end possibly too
                kind = rng.choice(["corrupt", "wrong", "artifact", "symlink"])
                if kind == "corrupt":  # a line damaged where it is
                    old = content[where]
                    cut = rng.randint(1, max(1, len(old) - 2))
                    content[where] = old[:cut] + bytes(rng.choice(b"#}]\x00\xff") for _ in range(3)) + b"\n"
                elif kind == "wrong":
                    content.insert(where, rng.choice(WRONG))
                elif kind == "artifact":
                    content.insert(where, record("artifact", path=rng.choice(
                        [str(outside / "secret.txt"), "../../../outside/secret.txt", "..", "/etc/passwd", "."])))
                else:
                    name = f"escape{rng.randint(0, 10 ** 6)}"
                    (journal / name).symlink_to(outside if rng.random() < 0.5 else outside / "secret.txt")
                    content.insert(where, record("artifact", path=name))
            if rng.random() < 0.3:
                content.append(b'{"op": "metrics", "metrics": {"x": 1')  # torn
            write(journal, content)
        expected = {j.name: valid_points(j) for j in invocation.iterdir()}
        ends = {j.name: any(_is_end(line) for line in lines(j)) for j in invocation.iterdir()}
        before_outside = {p: p.read_bytes() for p in outside.rglob("*")}

        code, err = sync(capsys, invocation, "--tracking-uri", uri)

        said = err.strip().splitlines()
        assert len(said) <= 12, err
        assert all(len(line) < 1500 for line in said), err
        assert not foreign.parent.exists(), f"case {n}: the journal's store was used"
        assert {p: p.read_bytes() for p in outside.rglob("*")} == before_outside
        assert {p.name for p in folder.iterdir()} <= {"journals", "outside", "store"}, f"case {n}"  # delivered: removed
        assert no_secret_in(folder / "store"), f"case {n}: a file outside the journal was read"
        runs = store_runs(uri)
        for role, name in (("parent", "parent.journal"), ("child", "naive.journal")):
            assert expected[name] <= runs[role][1], f"case {n}: {role} lost {expected[name] - runs[role][1]}"
            if ends[name]:
                assert runs[role][0] == "FINISHED", f"case {n}"
        assert code in (0, 1)


def test_python_dash_m_cl_sync_on_a_bad_journal_says_one_line_each(case):
    invocation, uri, _, _ = case
    child = invocation / "naive.journal"
    write(child, [b"[]\n"] + lines(child))
    (invocation / "parent.journal" / "state.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "cl", "sync", str(invocation), "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr
