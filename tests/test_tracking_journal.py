"""Tracking that loses nothing: a run killed at any moment and resumed ends as one FINISHED
MLflow run with every metric once; processes share one SQLite store; a tracking server
that dies mid-run and comes back gets every record."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from cl.tracking.journal import Journal
from conftest import tiny_experiment


def experiment(folder, epochs=2, memory_size=60):
    """`folder/exp.yaml`: replay at seed 2 on Split-Digits, an MLP of 32, batches of 32 by SGD with
    momentum, the LR logged every 5 iterations."""
    return tiny_experiment(folder, name="journal-test", seed=2, threads=1, hidden=(32,), epochs=epochs,
                           batch_size=32, lr_log_every=5, momentum=0.9,
                           strategies=[{"name": "replay", "memory_size": memory_size, "replay_batch_size": 16}])

# Runs `cl` with one function patched to SIGKILL the process at a chosen moment.
KILLER = textwrap.dedent("""
    import os, signal, sys
    moment, argv = sys.argv[1], sys.argv[2:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "training":  # in the middle of experience 3
        import cl.training.trainer as trainer
        original, calls = trainer.LifelongTrainer._train_batch, [0]

        def train_batch(self, *args):
            calls[0] += 1
            if calls[0] == 45:
                die()
            return original(self, *args)
        trainer.LifelongTrainer._train_batch = train_batch
    elif moment == "checkpoint":  # half-way through writing the third checkpoint
        import cl.training.checkpoint as checkpoint
        original, calls = checkpoint.torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                with open(f, "wb") as out:
                    out.write(b"half a checkpoint")
                die()
            return original(obj, f, *args, **kwargs)
        checkpoint.torch.save = save
    elif moment == "final":  # while the final plots are being delivered, by a thread of the run's process
        import cl.tracking.deliverer as tracking
        os.environ["CL_TRACKING_DELIVERY"] = "thread"
        original = tracking.Deliverer._deliver_next

        def deliver_next(self):
            record = self.journal.records[self.journal.state["delivered"]]
            if record["op"] == "artifact" and record["path"].endswith("accuracy_matrix.png"):
                die()
            return original(self)
        tracking.Deliverer._deliver_next = deliver_next
    elif moment == "final-child":  # the final plots handed to the delivery child, not all delivered yet
        import cl.tracking.sink as tracking
        os.environ["CL_TRACKING_DELIVERY"] = "process"
        original = tracking.MLflowSink.log_artifact

        def log_artifact(self, name, data):
            original(self, name, data)
            if name == "accuracy_matrix.png":
                die()
        tracking.MLflowSink.log_artifact = log_artifact
    from cl.cli.main import main
    sys.exit(main(argv))
""")


def cl(*args, moment=None, env=None, check=True):
    command = [sys.executable, "-c", KILLER, moment or "none", "run", *args, "--no-progress", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def store_contents(uri: str, experiment: str = "journal-test") -> dict:
    """Every run of the experiment: {role: [(status, {metric: [steps]}, matrix)]}."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        steps = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
        out.setdefault(run.data.tags.get("cl.role", "child"), []).append((run.info.status, steps, run))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    path = experiment(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = cl(str(path), "--tracking-uri", uri, env={"CL_JOURNAL_DIR": str(tmp / "j")})
    return json.loads(proc.stdout.strip().splitlines()[-1]), store_contents(uri)


@pytest.mark.parametrize("moment", ["training", "checkpoint", "final", "final-child"])
def test_sigkill_at_any_moment_then_resume_gives_one_finished_run_with_every_metric_once(
        moment, uninterrupted, tmp_path):
    whole, whole_store = uninterrupted
    path = experiment(tmp_path)
    uri, ckpt = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ckpt"
    killed = cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt), moment=moment, check=False)
    assert killed.returncode == -signal.SIGKILL
    resumed = json.loads(cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt), "--resume")
                         .stdout.strip().splitlines()[-1])
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]

    store = store_contents(uri)
    assert [status for status, _, _ in store["child"]] == ["FINISHED"]
    assert [status for status, _, _ in store["parent"]] == ["FINISHED"]
    _, steps, run = store["child"][0]
    _, whole_steps, _ = whole_store["child"][0]
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), f"{key} logged twice at a step: {logged}"
    # Every metric of the uninterrupted run, at the same steps (timings aside, which differ).
    assert set(steps) == set(whole_steps)
    assert {k: v for k, v in steps.items()} == whole_steps
    assert run.data.metrics["acc"] == pytest.approx(whole["acc"])
    assert resumed["mlflow_run_id"] == run.info.run_id


def test_resuming_a_finished_run_logs_nothing_twice_and_keeps_it_finished(tmp_path, capsys):
    path = experiment(tmp_path)
    uri, ckpt = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ckpt"
    first = json.loads(cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt)).stdout.splitlines()[-1])
    before = store_contents(uri)
    again = cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt), "--resume")
    assert "finished before" in again.stderr
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["accuracy_matrix"] == first["accuracy_matrix"] and second["mlflow_run_id"] == first["mlflow_run_id"]
    after = store_contents(uri)
    assert [(s, m) for s, m, _ in after["child"]] == [(s, m) for s, m, _ in before["child"]]
    assert [s for s, _, _ in after["parent"]] == ["FINISHED"]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    path = experiment(tmp_path)
    proc = cl(str(path), "--no-track", "--checkpoint-dir", str(tmp_path / "none"), "--resume")
    assert "no checkpoint of replay" in proc.stderr and "trains from the beginning" in proc.stderr


def test_four_processes_share_one_sqlite_store(tmp_path):
    """Fresh and then existing: every run of four processes started together is complete."""
    path = experiment(tmp_path, epochs=1)
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    said = []
    for round_ in range(2):  # the store does not exist yet, then it does
        procs = [subprocess.Popen([sys.executable, "-m", "cl", "run", str(path), "--tracking-uri", uri,
                                   "--no-progress", "--set", f"seed={10 * round_ + k}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        said += errors
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
        assert not any("Traceback" in e or "locked" in e for e in errors), errors
    store = store_contents(uri)
    assert sorted(s for s, _, _ in store["child"]) == ["FINISHED"] * 8, said
    assert sorted(s for s, _, _ in store["parent"]) == ["FINISHED"] * 8
    assert sorted(run.data.tags["seed"] for _, _, run in store["child"]) == sorted(
        str(s) for s in (0, 1, 2, 3, 10, 11, 12, 13))
    counts = {len(steps.get("acc_seen", [])) for _, steps, _ in store["child"]}
    assert counts == {5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(db: str, port: int, artifacts: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--artifacts-destination", artifacts],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_tracking_server_that_dies_mid_run_and_comes_back_gets_every_metric(tmp_path):
    path = experiment(tmp_path, epochs=12)  # long enough to kill under
    reference = f"sqlite:///{tmp_path / 'reference.db'}"
    cl(str(path), "--tracking-uri", reference)  # the same run, uninterrupted
    port, db = _free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    uri = f"http://127.0.0.1:{port}"
    server = _server(db, port, str(tmp_path / "artifacts"))
    run = subprocess.Popen([sys.executable, "-m", "cl", "run", str(path), "--tracking-uri", uri, "--no-progress",
                            "--json", "--tracking-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline, client = time.time() + 120, MlflowClient(uri)
        while time.time() < deadline:  # the server goes down once the run's first metrics are in
            try:
                exp = client.get_experiment_by_name("journal-test")
                if exp and any(r.data.metrics for r in client.search_runs([exp.experiment_id])):
                    break
            except Exception:
                pass
            time.sleep(0.3)
        _stop(server)
        time.sleep(3)
        assert run.poll() is None  # training went on without the server
        server = _server(db, port, str(tmp_path / "artifacts"))
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        store = store_contents(uri)
    finally:
        if run.poll() is None:
            run.kill()
        _stop(server)
    assert [s for s, _, _ in store["child"]] == ["FINISHED"] and [s for s, _, _ in store["parent"]] == ["FINISHED"]
    _, steps, child = store["child"][0]
    _, expected, _ = store_contents(reference)["child"][0]
    assert steps == expected  # every metric of the uninterrupted run, each step once
    assert sum(len(v) for v in steps.values()) == sum(len(v) for v in expected.values())
    assert child.data.metrics["acc"] == pytest.approx(result["acc"])


def test_a_server_down_at_start_loses_nothing_and_says_so_within_the_timeout(tmp_path, journal_dir):
    """Nothing listens on the port: the run trains and reports, the user is told what waits
    and where; `cl sync` later delivers every record (here into a SQLite store)."""
    path = experiment(tmp_path)
    proc = cl(str(path), "--tracking-uri", f"http://127.0.0.1:{_free_port()}", "--tracking-timeout", "0.5")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["accuracy_matrix"]) == 6 and result["mlflow_run_id"] is None
    assert "does not answer" in proc.stderr and "cl sync" in proc.stderr
    journals = sorted(p.name for p in journal_dir.rglob("*.journal"))
    assert journals == ["parent.journal", "replay.journal"]
    child = Journal(next(journal_dir.rglob("replay.journal")), owner=False)  # a look; `cl sync` will own it
    assert child.pending == len(child.records) and child.ended["status"] == "FINISHED"
    child.close()

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    sync = subprocess.run([sys.executable, "-m", "cl", "sync", str(journal_dir), "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    store = store_contents(uri)
    assert [s for s, _, _ in store["child"]] == ["FINISHED"] and [s for s, _, _ in store["parent"]] == ["FINISHED"]
    _, steps, run = store["child"][0]
    assert steps["acc_seen"] == [1, 2, 3, 4, 5] and run.data.metrics["acc"] == pytest.approx(result["acc"])
    assert run.data.tags["mlflow.parentRunId"] == store["parent"][0][2].info.run_id
    assert not journal_dir.exists()


def test_journal_keeps_its_run_key_from_the_start_and_has_one_owner(tmp_path):
    from cl.tracking.journal import JournalBusy

    journal = Journal(tmp_path / "j")
    key = journal.state["key"]
    assert json.loads((tmp_path / "j" / "state.json").read_text())["key"] == key  # before any run carries it
    with pytest.raises(JournalBusy, match="in use by another process"):
        Journal(tmp_path / "j")
    journal.close()
    again = Journal(tmp_path / "j")
    assert again.state["key"] == key
    again.close()


def test_a_record_of_more_metrics_than_mlflow_takes_at_once_is_delivered_in_parts(tmp_path):
    from cl.tracking.deliverer import Deliverer

    class Client:
        def __init__(self):
            self.batches = []

        def log_batch(self, run_id, metrics=(), **kwargs):
            assert len(metrics) <= 1000
            self.batches.append(len(metrics))

    journal = Journal(tmp_path / "j")
    journal.append("create", experiment="e", name="n", params={}, tags={"cl.run_key": journal.state["key"]})
    journal.append("metrics", metrics={f"acc_task{j}": 0.5 for j in range(2500)}, step=1)
    journal.append("metrics", metrics={"lr": 0.1}, step=2)
    journal.mark_delivered(1, run_id="r", experiment_id="0")
    deliverer = Deliverer(journal, None)
    deliverer._client = Client()
    assert deliverer.deliver() and journal.pending == 0
    assert deliverer._client.batches == [1000, 1000, 500, 1]
    journal.close()


def test_a_refused_resume_leaves_the_finished_runs_finished(tmp_path):
    path = experiment(tmp_path, epochs=1)
    uri, ckpt = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ckpt"
    cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt))
    before = store_contents(uri)
    experiment(tmp_path, epochs=1, memory_size=80)  # a changed configuration
    refused = cl(str(path), "--tracking-uri", uri, "--checkpoint-dir", str(ckpt), "--resume", check=False)
    assert refused.returncode == 2 and "refused" in refused.stderr
    after = store_contents(uri)
    assert [s for s, _, _ in after["child"]] == ["FINISHED"] and [s for s, _, _ in after["parent"]] == ["FINISHED"]
    assert [m for _, m, _ in after["child"]] == [m for _, m, _ in before["child"]]
