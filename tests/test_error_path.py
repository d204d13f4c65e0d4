"""Failures a user causes end in one line and an honest status (issue 24, in part)."""
from __future__ import annotations

from conftest import tiny_experiment
from mlflow.tracking import MlflowClient

from cl.cli.main import main


def test_a_checkpoint_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = tiny_experiment(tmp_path, "exp.yaml", epochs=1, hidden=(16,))
    (tmp_path / "afile").write_text("not a folder")
    assert main(["run", str(path), "--no-track", "--no-progress", "--checkpoint-dir", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cl: error: --checkpoint-dir {tmp_path / 'afile'} is a file, not a folder: give a folder "
                   f"(it is made if missing)"]
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_parent_whose_run_failed_is_not_finished(tmp_path, capsys):
    """EWC at its default strength diverges on this setting (tests/test_stability_note.py): the
    run ends FAILED, `cl run` exits 1, and the parent says FAILED too, not FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, "exp.yaml", name="diverges", lr=0.05, momentum=0.9, n_experiences=5,
                           strategies=None, runs={"ewc": ["ewc"], "naive": ["naive"]})
    assert main(["run", str(path), "--tracking-uri", uri, "--no-progress"]) == 1
    capsys.readouterr()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("diverges").experiment_id])
    status = {r.data.tags.get("cl.role", r.data.tags.get("strategy")): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "ewc": "FAILED", "naive": "FINISHED"}


# ---------------------------------------------------------------- through the `cl` command
# Each failure below is caused as a user would, through `python -m cl`, and must end in one
# line on standard error (no traceback), the documented exit code (cl/cli/main.py) and no
# `.tmp` left behind.
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cl.training.checkpoint import save_checkpoint


def cl_command(*args, env=None, preexec_fn=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The only line on standard error, which holds no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def no_tmp(*folders: Path) -> None:
    left = [p for folder in folders for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]
    assert left == []


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` (made), or None where mounting is refused (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def statuses(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.data.tags.get("cl.role", r.data.tags.get("strategy")): r.info.status for r in runs}


@pytest.fixture
def unwritable(tmp_path):
    """A folder the run cannot write in: on a read-only file system where one can be mounted
    (root), else a path through a regular file (which no user can write either)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        if mounted is not None:
            yield mounted / "sub", "Read-only file system"
            return
    (tmp_path / "afile").write_text("a file")
    yield tmp_path / "afile" / "sub", "is a file, not a folder"


def test_a_folder_under_a_file_is_one_line_and_exit_2(tmp_path):
    """The case every machine can make (the fixture above makes it only where mounting fails)."""
    (tmp_path / "afile").write_text("a file")
    path = tiny_experiment(tmp_path, "exp.yaml", n_experiences=2)
    proc = cl_command("run", str(path), "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      env={"CL_JOURNAL_DIR": str(tmp_path / "afile" / "j"), "CL_TRACKING_DELIVERY": "thread"})
    assert proc.returncode == 2
    assert one_line(proc) == (f"cl: error: CL_JOURNAL_DIR {tmp_path / 'afile' / 'j'} cannot be used: "
                              f"{tmp_path / 'afile'} is a file, not a folder; set CL_JOURNAL_DIR to a folder you "
                              f"can write (or give --checkpoint-dir, where the journals then live)")
    assert (tmp_path / "afile").read_text() == "a file"


def test_a_journal_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, unwritable):
    folder, reason = unwritable
    path = tiny_experiment(tmp_path, "exp.yaml", n_experiences=2)
    proc = cl_command("run", str(path), "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      env={"CL_JOURNAL_DIR": str(folder), "CL_TRACKING_DELIVERY": "thread"})
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith(f"cl: error: CL_JOURNAL_DIR {folder} cannot be") and reason in line
    assert "set CL_JOURNAL_DIR to a folder you can write" in line
    no_tmp(tmp_path)


def test_a_checkpoint_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, unwritable):
    folder, reason = unwritable
    path = tiny_experiment(tmp_path, "exp.yaml", n_experiences=2)
    proc = cl_command("run", str(path), "--no-progress", "--no-track", "--checkpoint-dir", str(folder))
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith(f"cl: error: --checkpoint-dir {folder} cannot be") and reason in line
    assert "give --checkpoint-dir a folder you can write" in line
    no_tmp(tmp_path)


def _file_size_limit(limit: int):
    def preexec():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_while_checkpointing_names_the_file_leaves_no_tmp_and_closes_the_runs(tmp_path):
    """An MLP of 512 units checkpoints ~200 kB after each experience: the second fills a
    256 kB disk. The run and its parent end FAILED (the failed checkpoint's space is free
    again for their ends), exit 1: the input was fine, the machine was not."""
    path = tiny_experiment(tmp_path, "exp.yaml", name="fills", hidden=(512,), n_experiences=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tmpfs(tmp_path / "small", "size=256k") as small:
        if small is not None:
            proc = cl_command("run", str(path), "--no-progress", "--tracking-uri", uri, "--checkpoint-dir",
                              str(small / "ck"))
            reason = "no space left on the device"
        else:  # no mount here: a file-size limit stands in for the full disk (the store would hit it too)
            small = tmp_path / "small"
            proc = cl_command("run", str(path), "--no-progress", "--no-track", "--checkpoint-dir", str(small / "ck"),
                              preexec_fn=_file_size_limit(100_000))
            reason, uri = "larger than this process may write", None
        assert proc.returncode == 1
        line = one_line(proc)
        assert re.fullmatch(rf"cl: error: \S*{small / 'ck' / 'naive.pt'}: {reason}.*", line), line
        no_tmp(tmp_path)
        if uri is not None:
            assert statuses(uri, "fills") == {"parent": "FAILED", "naive": "FAILED"}


def test_a_full_disk_under_the_journals_names_the_file_and_closes_the_runs(tmp_path):
    """CL_JOURNAL_DIR on a disk of 24 kB: the run's artifacts do not fit in its journal. The
    run ends FAILED, not RUNNING, and the line names the journal's file."""
    path = tiny_experiment(tmp_path, "exp.yaml", name="journal-fills", hidden=(512,), n_experiences=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tmpfs(tmp_path / "small", "size=24k") as small:
        if small is None:
            pytest.skip("mounting a tmpfs is refused here; the checkpoint test covers the file-size limit")
        proc = cl_command("run", str(path), "--no-progress", "--tracking-uri", uri, env={"CL_JOURNAL_DIR": str(small)})
        assert proc.returncode == 1
        line = one_line(proc)
        assert re.fullmatch(rf"cl: error: {small}/\S+\.journal/\S+: no space left on the device; free some space.*",
                            line), line
        no_tmp(tmp_path)
        assert "RUNNING" not in statuses(uri, "journal-fills").values()


def test_a_checkpoint_without_its_config_hash_is_refused_in_one_line_exit_2(tmp_path):
    """A lab checkpoint whose meta holds no config hash (an older lab's): its weights are never
    tried on this model."""
    path = tiny_experiment(tmp_path, "exp.yaml", n_experiences=2)
    ck = tmp_path / "ck"
    save_checkpoint(ck / "naive.pt", {"model": {}}, {"config": {}})
    proc = cl_command("run", str(path), "--no-progress", "--no-track", "--checkpoint-dir", str(ck), "--resume")
    assert proc.returncode == 2
    assert one_line(proc) == (f"cl: error: checkpoint {ck / 'naive.pt'} does not record the configuration it was "
                              f"written for, so resuming from it is refused: start afresh without --resume, or move "
                              f"it out of the --checkpoint-dir")
    no_tmp(tmp_path)


def _wait_for(predicate, proc, seconds=90.0):
    end = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the moment to interrupt never came"
        time.sleep(0.05)


def _journal_holds(folder: Path, op: str) -> bool:
    return any(f'"op": "{op}"' in p.read_text() for p in folder.rglob("records.jsonl"))


def interrupted_twice(options: list[str], path, journals, record: str, pause: float, timeout: float):
    """`cl run path` in its own process group, sent Ctrl-C twice, `pause` seconds apart, once a
    journal under `journals` holds a `record` record; its (stdout, stderr, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "cl", "run", str(path), "--no-progress", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "CL_JOURNAL_DIR": str(journals)})
    try:
        _wait_for(lambda: _journal_holds(journals, record), proc)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(pause)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out, err, proc


def test_interrupted_twice_while_delivery_waits_says_which_journal_waits_and_how_to_deliver_it(tmp_path):
    """The run has finished and waits for a store that does not answer; a first Ctrl-C keeps
    waiting for delivery, a second stops the wait: one line names the journals and the `cl sync`
    that delivers them, exit 130. That command then delivers every run, none left RUNNING."""
    path = tiny_experiment(tmp_path, "exp.yaml", name="twice", n_experiences=2)
    journals = tmp_path / "journals"
    # Interrupted twice once the child run's end is journaled and waits for delivery.
    out, err, proc = interrupted_twice(["--tracking-uri", "http://127.0.0.1:9", "--tracking-timeout", "60"], path,
                                       journals, "end", pause=0.3, timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"cl: interrupted; \d+ record\(s\) wait undelivered in (\S+): deliver them with "
                         r"`cl sync (\S+) --tracking-uri http://127\.0\.0\.1:9`", last)
    assert found and found[1] == found[2] and Path(found[1]).parent == journals, last
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    synced = cl_command("sync", found[1], "--tracking-uri", uri)
    assert synced.returncode == 0, synced.stderr
    assert statuses(uri, "twice") == {"parent": "KILLED", "naive": "FINISHED"}


def test_two_quick_interrupts_while_training_close_every_run(tmp_path):
    """Two Ctrl-C 0.2 s apart while a run trains: the run and its parent end KILLED in the
    store (delivered, or delivered by the `cl sync` the line names), never RUNNING."""
    path = tiny_experiment(tmp_path, "exp.yaml", name="quick", n_experiences=5, epochs=30, hidden=(256,))
    uri, journals = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "journals"
    out, err, proc = interrupted_twice(["--tracking-uri", uri], path, journals, "metrics", pause=0.2, timeout=60)
    assert proc.returncode == 130, err
    line = one_line(subprocess.CompletedProcess([], 130, out, err))
    waits = re.fullmatch(r"cl: interrupted; \d+ record\(s\) wait undelivered in (\S+): deliver them with "
                         r"`cl sync (\S+) --tracking-uri \S+`", line)
    if waits:
        assert cl_command("sync", waits[2], "--tracking-uri", uri).returncode == 0
    else:
        assert line == "cl: interrupted; unfinished runs end KILLED in MLflow, their checkpoints kept"
    assert statuses(uri, "quick") == {"parent": "KILLED", "naive": "KILLED"}


@pytest.mark.parametrize("name", ["../../x:Y", "/tmp/evil:Y", ".relative:Y", "x:Y;rm"])
def test_a_strategy_path_that_is_not_a_module_name_is_one_line_and_exit_2(tmp_path, name):
    path = tiny_experiment(tmp_path, "exp.yaml", strategies=[name])
    proc = cl_command("run", str(path), "--no-track", "--no-progress")
    line = one_line(proc)
    assert proc.returncode == 2 and f"'{name}'" in line and "not by a path" in line
