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
