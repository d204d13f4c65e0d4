"""A tracking store is created completely or not at all, whoever dies when; and a store that
cannot take records (its disk full) is one line, not a traceback per retry.

Driven through `cl run` as a user would: a fresh SQLite store, the parent killed with SIGKILL
at many moments of its first seconds (before the store exists, while it is built, after),
the delivery child too; the store is then opened as MLflow opens it."""
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

STORE = "mlflow.db"


def experiment(folder: Path) -> Path:
    """The smallest run worth tracking: Split-Digits in 2 experiences, an MLP of 8, one epoch."""
    path = folder / "exp.yaml"
    path.write_text(textwrap.dedent("""\
        name: creation
        seed: 0
        device: cpu
        threads: 1
        stream: {dataset: digits, scenario: {name: class_incremental, n_experiences: 2}}
        model: {name: mlp, hidden: [8]}
        training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.05}}
        strategies: [naive]
        """))
    return path


def start(path: Path, uri: str, journals: Path, timeout: float = 5, **popen) -> subprocess.Popen:
    # The delivery child inherits standard error: reading it to its end waits for both processes.
    return subprocess.Popen([sys.executable, "-m", "cl", "run", str(path), "--tracking-uri", uri, "--no-progress",
                             "--tracking-timeout", str(timeout)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CL_JOURNAL_DIR": str(journals)}, **popen)


def store_begun(folder: Path) -> bool:
    """The store, or a file it is being built in, exists (its lock file does not count)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return False
    return any(n == STORE or (n.startswith(f".{STORE}") and not n.endswith(".lock")) or n == f"{STORE}-journal"
               for n in names)


def delivery_child(pid: int) -> int | None:
    """The delivery child of process `pid` (Linux's /proc), or None if it has none yet."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"cl.tracking.delivery" in cmdline:
            return int(entry)
    return None


def leftovers(folder: Path) -> list[str]:
    """What lies beside the store that a clean run does not leave (the lock file stays, as it always has)."""
    return sorted(n for n in os.listdir(folder) if n not in (STORE, f"{STORE}.lock", "mlruns"))


def check_store(folder: Path) -> None:
    """The store opens as MLflow opens it (no schema error), and nothing is left beside it."""
    uri = f"sqlite:///{folder / STORE}"
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert "Default" in names, names
    assert leftovers(folder) == [], f"{folder}: {leftovers(folder)}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the delivery child through /proc")
def test_a_fresh_store_is_complete_or_absent_whenever_the_parent_or_the_child_is_killed(tmp_path):
    path = experiment(tmp_path)
    # (whom to kill, from when, seconds after): the parent from its start (before any store), and
    # from the moment the store (or the file it is built in) appears: while it is built, and after;
    # the delivery child while it builds the store.
    moments = [("parent", "start", 0.3), ("parent", "start", 1.5)] + \
        [("parent", "store", d) for d in (0.0, 0.05, 0.15, 0.4, 1.0, 3.0)] + \
        [("child", "store", d) for d in (0.05, 0.4)]
    runs = []
    for k, (whom, anchor, delay) in enumerate(moments):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        proc = start(path, f"sqlite:///{folder / STORE}", tmp_path / f"j{k}")
        runs.append({"whom": whom, "anchor": anchor, "delay": delay, "folder": folder, "proc": proc,
                     "t0": time.monotonic(), "since": None, "done": False, "killed": None})
    deadline = time.monotonic() + 120
    while not all(r["done"] for r in runs) and time.monotonic() < deadline:
        now = time.monotonic()
        for r in runs:
            if r["done"]:
                continue
            if r["proc"].poll() is not None:  # ended before its moment came
                r["done"] = True
                continue
            if r["since"] is None:
                if r["anchor"] == "start":
                    r["since"] = r["t0"]
                elif store_begun(r["folder"]):
                    r["since"] = now
            if r["since"] is None or now - r["since"] < r["delay"]:
                continue
            child = delivery_child(r["proc"].pid)
            target = r["proc"].pid if r["whom"] == "parent" else child
            if target is not None:
                os.kill(target, signal.SIGKILL)
                r["killed"] = r["whom"]
            r["done"] = True
        time.sleep(0.005)
    stderr = {}
    for r in runs:
        # Until the parent and the child both end (a child left alone finishes its store first).
        stderr[r["folder"].name] = r["proc"].communicate(timeout=120)[1]
    killed = [(r["whom"], r["anchor"], r["delay"]) for r in runs if r["killed"]]
    assert len(killed) >= 7, f"too few moments reached: {killed}"
    # The next opener of a store whose creator was killed removes what it left (and builds the
    # store): here `cl sync`, delivering what the killed child had not.
    syncs = [subprocess.Popen([sys.executable, "-m", "cl", "sync", str(tmp_path / f"j{runs.index(r)}"),
                               "--tracking-uri", f"sqlite:///{r['folder'] / STORE}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in runs if r["whom"] == "child" and r["killed"]]
    for sync in syncs:
        err = sync.communicate(timeout=120)[1]
        assert sync.returncode == 0 and "Traceback" not in err, err
    for r in runs:
        try:
            check_store(r["folder"])
        except Exception as err:
            raise AssertionError(f"killed the {r['whom']} {r['delay']} s after the {r['anchor']}: {err}\n"
                                 f"{stderr[r['folder'].name][-2000:]}") from err


def _fill(folder: Path) -> None:
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:  # full
        pass


def test_a_store_whose_disk_is_full_is_one_line_per_journal_naming_it_and_cl_sync(tmp_path):
    """A store that has no room: the run goes on and says so in a few lines (the store, the
    problem, what waits where, the `cl sync` that delivers it), no traceback per retry."""
    path = experiment(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    # A fresh store is some 950 kB: a disk of 1.2 MB holds it, and then a file filling the rest.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    preexec = None
    try:
        MlflowClient(f"sqlite:///{disk / STORE}").search_experiments()  # a complete store
        if mounted:
            _fill(disk)
        else:  # no mount allowed here: no file may grow past the store's size
            size = (disk / STORE).stat().st_size

            def preexec():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
                resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        uri = f"sqlite:///{disk / STORE}"
        proc = start(path, uri, tmp_path / "journals", preexec_fn=preexec, timeout=1)
        _, err = proc.communicate(timeout=180)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[:3000]
    assert 1 <= len(lines) <= 6, err[:3000]
    assert all(uri in line and "disk is full" in line and "cl sync" in line for line in lines), err
