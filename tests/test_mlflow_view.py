"""The winner at a glance (issue 25): after `cl run`, the parent's description leads with the
comparison as a Markdown table, best first; the experiment holds a saved view of the
invocation's children (strategy, seed and the comparison's metrics as columns, best first),
which the printed link opens; final scalars are at step 0, so MLflow shows them as numbers.
A journal's `view` record can set only the lab's view tag, on its own run's experiment."""
import contextlib
import io
import json
import re
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from cl.tracking import views
from cl.tracking.deliverer import Deliverer
from cl.tracking.journal import Journal
from conftest import tiny_experiment

COMPARED = {"naive": ["naive"], "replay": [{"name": "replay", "memory_size": 60, "replay_batch_size": 16}]}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """`cl run FILE --seeds 0,1` (naive and replay) on a fresh SQLite store: (result, stderr, URI)."""
    tmp = tmp_path_factory.mktemp("view")
    path = tiny_experiment(tmp, "view.yaml", name="view-test", threads=1, hidden=(16,), batch_size=32,
                           momentum=0.9, strategies=None, runs=COMPARED)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as env:
        env.setenv("CL_JOURNAL_DIR", str(tmp / "cl-journal"))
        code = main(["run", str(path), "--seeds", "0,1", "--tracking-uri", uri, "--json", "--no-progress"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue(), uri


def parent_and_children(result, uri):
    client = MlflowClient(uri)
    parent = client.get_run(result["runs"][0]["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the Markdown table that `markdown` starts with (header first, no rule)."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert rows and all(set(c) <= set("-: ") for c in rows[1]), markdown  # the header's rule
    return [rows[0]] + rows[2:]


def test_the_parents_description_leads_with_the_table_best_first(ran):
    result, _, uri = ran
    _, parent, children = parent_and_children(result, uri)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("| rank | strategy |")  # the first thing in the collapsed 100 px
    head, *rows = table_rows(note)
    assert head[:4] == ["rank", "strategy", "runs", "seeds"] and {"acc", "vs best", "forgetting", "bwt"} <= set(head)
    assert len(rows) == 2  # one row per strategy
    means = {s: np.mean([r.data.metrics["acc"] for r in children if r.data.tags["strategy"] == s])
             for s in COMPARED}
    assert [r[1] for r in rows] == sorted(means, key=means.get, reverse=True)
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][head.index("vs best")] == "best"
    assert all(r[2] == "2" and r[3] == "0,1" for r in rows)
    acc = rows[0][head.index("acc")]
    assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}", acc) and float(acc.split()[0]) == pytest.approx(
        max(means.values()), abs=1e-4)
    caption = note[note.index("\n\n") + 2:]
    assert "mean ± std over seeds 0,1" in caption and "95% interval" in caption


def test_the_experiment_holds_a_view_of_the_children_that_the_printed_link_opens(ran):
    result, err, uri = ran
    client, parent, children = parent_and_children(result, uri)
    exp = client.get_experiment(parent.info.experiment_id)
    key = f"cl-{parent.info.run_id}"
    assert [t for t in exp.tags if t.startswith(views.TAG_PREFIX)] == [views.TAG_PREFIX + key]
    envelope = json.loads(exp.tags[views.TAG_PREFIX + key])
    assert envelope["name"].startswith("cl: view-test-") and envelope["state"].startswith("deflate;")
    state = views.read_state(exp.tags[views.TAG_PREFIX + key])
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    assert state["selectedColumns"] == ["tags.`strategy`", "tags.`seed`", "metrics.`acc`", "metrics.`forgetting`",
                                        "metrics.`bwt`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`acc`", False)
    charts = {c["metricKey"]: c for c in state["compareRunCharts"]}
    assert {k: c["type"] for k, c in charts.items()} == {"acc": "BAR", "forgetting": "BAR", "bwt": "BAR",
                                                         "acc_seen": "LINE"}
    assert charts["acc_seen"]["range"] == {"yMin": 0.0, "yMax": 1.0}
    # The view's filter finds exactly this invocation's children.
    found = client.search_runs([exp.experiment_id], state["searchFilter"])
    assert {r.info.run_id for r in found} == {r.info.run_id for r in children} and len(children) == 4
    link = f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"
    assert f"MLflow: http://127.0.0.1:5000{link}" in err
    assert f"/runs/{parent.info.run_id}?workflowType=machine_learning" in err  # the parent's page, too


def test_final_scalars_are_at_step_0(ran):
    result, _, uri = ran
    client, parent, children = parent_and_children(result, uri)
    for child in children:
        for key in ("acc", "bwt", "forgetting"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0]
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "acc_seen")) == [1, 2, 3, 4, 5]
    for key in ("naive/acc_mean", "replay/acc_std", "replay/forgetting_mean"):
        assert [m.step for m in client.get_metric_history(parent.info.run_id, key)] == [0]


def test_a_summary_written_again_at_step_0_is_the_one_shown(tmp_path, tracking_uri):
    """A resumed run writes its summary again at step 0: the journal keeps it where its value
    changed (it drops other points it holds already), and MLflow shows the newer value."""
    journal = Journal(tmp_path / "j")
    journal.append("create", experiment="again", name="r", params={}, tags={"cl.run_key": journal.state["key"]})
    journal.append("metrics", metrics={"acc": 0.25}, step=0, again=True)
    journal.append("metrics", metrics={"acc": 0.5}, step=0)  # an ordinary point it holds: dropped
    time.sleep(0.01)
    journal.append("metrics", metrics={"acc": 0.75}, step=0, again=True)
    journal.append("metrics", metrics={"acc": 0.75}, step=0, again=True)  # the same value: no second point
    assert [r["metrics"]["acc"] for r in journal.records if r["op"] == "metrics"] == [0.25, 0.75]
    assert Deliverer(journal, tracking_uri).deliver()
    assert MlflowClient(tracking_uri).get_run(journal.state["run_id"]).data.metrics["acc"] == 0.75
    journal.close()


def _journal_with(folder, experiment: str, *lines: dict) -> Journal:
    """A journal of one run in `experiment`, then the records `lines`, written as a file would hold them."""
    journal = Journal(folder)
    journal.append("create", experiment=experiment, name="r", params={}, tags={"cl.run_key": journal.state["key"]})
    journal.close()
    with open(folder / "records.jsonl", "a") as f:
        for line in lines:
            f.write(json.dumps({"time": int(time.time() * 1000), **line}) + "\n")
    return journal


def test_a_journal_sets_no_other_tag_and_no_other_experiments(tmp_path, tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    other = client.create_experiment("other")
    client.set_experiment_tag(other, "mlflow.note.content", "mine")
    state = {"selectedColumns": ["metrics.`acc`"], "searchFilter": "attributes.status = 'FAILED'", "evil": "x"}
    _journal_with(tmp_path / "j", "hostile", {"op": "view", "name": "v", "state": state},
                  {"op": "view", "name": "v", "state": state, "key": "mlflow.note.content"},
                  {"op": "view", "name": "v", "state": state, "experiment_id": other},
                  {"op": "view", "name": "v", "state": state, "tag": "mlflow.sharedViewState.x"})
    code = main(["sync", str(tmp_path / "j"), "--tracking-uri", tracking_uri])
    err = capsys.readouterr().err
    assert code == 1 and "3 line(s) that are not records passed over" in err and "Traceback" not in err
    assert client.get_experiment(other).tags == {"mlflow.note.content": "mine"}  # untouched
    run_id = json.loads((tmp_path / "j" / "state.json").read_text())["run_id"]
    exp = client.get_experiment_by_name("hostile")
    assert {t for t in exp.tags if not t.startswith("mlflow.") or t.startswith(views.TAG_PREFIX)} == {
        views.TAG_PREFIX + f"cl-{run_id}"}
    kept = views.read_state(exp.tags[views.TAG_PREFIX + f"cl-{run_id}"])
    # The filter is the lab's (this run's children), whatever the journal said; unknown fields are dropped.
    assert kept == {"selectedColumns": ["metrics.`acc`"], "searchFilter": f"tags.mlflow.parentRunId = '{run_id}'"}


def test_only_the_labs_newest_views_are_kept(tmp_path, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("many")
    for i in range(views.KEEP + 3):  # older views of the lab's, and one of the user's
        client.set_experiment_tag(exp, f"{views.TAG_PREFIX}cl-old{i:02d}",
                                  json.dumps({"name": "old", "createdAt": 1000 + i, "updatedAt": 0, "state": "{}"}))
    client.set_experiment_tag(exp, f"{views.TAG_PREFIX}users-own", json.dumps({"name": "u", "createdAt": 1}))
    _journal_with(tmp_path / "j", "many", {"op": "view", "name": "new", "state": {}})
    journal = Journal(tmp_path / "j")
    assert Deliverer(journal, tracking_uri).deliver()
    tags = client.get_experiment(exp).tags
    lab = sorted(t for t in tags if t.startswith(views.TAG_PREFIX + "cl-"))
    assert len(lab) == views.KEEP and f"{views.TAG_PREFIX}cl-{journal.state['run_id']}" in lab
    assert f"{views.TAG_PREFIX}cl-old{views.KEEP + 2:02d}" in lab and f"{views.TAG_PREFIX}cl-old03" not in lab
    assert f"{views.TAG_PREFIX}users-own" in tags
    journal.close()
