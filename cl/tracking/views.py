"""A saved view of an experiment's runs list: the children of one `cl run`, best first, with
the comparison's columns and charts, opened by the link `cl run` and `cl ui` print.

MLflow's UI (3.x) takes no columns from its URL; what it does take is a view saved as an
experiment tag, `mlflow.sharedViewState.<key>`, whose value is {"name", "createdAt",
"updatedAt", "state"}, `state` being the runs page's own state (filter, order, columns,
charts) as JSON or as "deflate;" + base64 of it zlib-compressed; the link
`#/experiments/<id>/runs?viewStateShareKey=<key>` opens it (any filter or order also in
the URL would make the UI drop the view, so the link holds nothing else).

The logger writes a `view` record to the parent's journal with the view's name and state;
the deliverer (`seal`) names the tag and sets the filter itself, from the run it delivers:
a journal is data and may not choose which tag or which experiment it writes. The lab's
views are keyed `cl-<run id>` and only the newest `KEEP` of an experiment are kept (the
UI lists at most 40 views; a user's own are never touched).
"""
from __future__ import annotations

import base64
import json
import re
import time
import zlib
from urllib.parse import urlencode

TAG_PREFIX = "mlflow.sharedViewState."
LAB_PREFIX = "cl-"  # the lab's views; a key the user's UI made never starts with it (UUIDs)
KEEP = 20
MAX_VALUE = 20000  # MLflow's longest experiment tag value
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")

# The parts of the runs page's state a view of the lab's may set; anything else a journal holds is dropped.
STATE_FIELDS = {"orderByKey": str, "orderByAsc": bool, "startTime": str, "lifecycleFilter": str,
                "datasetsFilter": list, "modelVersionFilter": str, "selectedColumns": list, "columnOrder": list,
                "columnWidths": dict, "runsHiddenMode": str, "compareRunCharts": list, "compareRunSections": list,
                "isAccordionReordered": bool, "hideEmptyCharts": bool}


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: metrics.`acc`, tags.`strategy`, params.`lr`."""
    return f"{kind}.`{key}`"


def view_key(run_id: str) -> str:
    """The key of the view of the parent run `run_id`'s children."""
    key = LAB_PREFIX + run_id
    if not _KEY.match(key):
        raise ValueError(f"a view's key must be letters, digits, - and _: {key!r}")
    return key


def children_state(metrics: list[str], ranking: str | None, higher: bool, seen_metric: str | None,
                   seen_range: tuple[float, float] | None) -> dict:
    """The state of a runs page that shows the strategy and seed tags and `metrics` as columns,
    ranked by `ranking`, with a bar chart per final metric (one bar per run: MLflow draws a
    metric as bars only when no run has it past step 0, which the lab's summaries are not
    after; declared here, they are bars whatever their step) and the per-experience
    `seen_metric` as lines, its y-axis fixed to `seen_range` (auto-scaled, a drop from 1.0 to
    0.9 fills the chart). The filter is set on delivery (`seal`)."""
    columns = [column("tags", "strategy"), column("tags", "seed")] + [column("metrics", m) for m in metrics]
    section = "cl-comparison"
    charts = [{"uuid": f"cl-bar-{m}", "type": "BAR", "metricKey": m, "displayName": m, "runsCountToCompare": 100,
               "metricSectionId": section, "deleted": False, "isGenerated": False} for m in metrics]
    if seen_metric:
        line = {"uuid": f"cl-line-{seen_metric}", "type": "LINE", "metricKey": seen_metric,
                "selectedMetricKeys": [seen_metric], "xAxisKey": "step", "xAxisScaleType": "linear",
                "yAxisKey": "metric", "scaleType": "linear", "lineSmoothness": 0, "displayPoints": True,
                "runsCountToCompare": 100, "metricSectionId": section, "deleted": False, "isGenerated": False}
        if seen_range is not None:  # the UI reads a line chart's fixed axes from `range`
            line["range"] = {"yMin": seen_range[0], "yMax": seen_range[1]}
        charts.append(line)
    return {
        "orderByKey": column("metrics", ranking) if ranking else "attributes.start_time",
        "orderByAsc": not higher if ranking else False,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": [column("attributes", "Run Name"), *columns],
        "columnWidths": {c: 120 for c in columns},
        "runsHiddenMode": "SHOW_ALL",  # every run in the charts (the UI's default: the first 10)
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": "Comparison", "display": True, "isReordered": True,
                                "deleted": False, "isGenerated": False}],
        "isAccordionReordered": True,
    }


def seal(run_id: str, name: str, state: dict, now_ms: int | None = None) -> tuple[str, str]:
    """The experiment tag (name, value) of the view a journal's `view` record asks for, for the
    run `run_id` the journal belongs to: keyed by that run, filtered to its children, holding
    only the state fields a view of the lab's sets. ValueError if it cannot be (a run id that is
    not one, a value MLflow would refuse as too long)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    kept = {k: v for k, v in state.items() if k in STATE_FIELDS and isinstance(v, STATE_FIELDS[k])}
    kept["searchFilter"] = f"tags.mlflow.parentRunId = '{run_id}'"
    raw = json.dumps(kept, separators=(",", ":"))
    now = int(time.time() * 1000) if now_ms is None else now_ms
    value = json.dumps({"name": str(name)[:200], "createdAt": now, "updatedAt": now,
                        "state": "deflate;" + base64.b64encode(zlib.compress(raw.encode())).decode()})
    if len(value) > MAX_VALUE:
        raise ValueError(f"the view is {len(value)} characters, MLflow keeps {MAX_VALUE} at most")
    return TAG_PREFIX + view_key(run_id), value


def read_state(value: str) -> dict:
    """A view tag's state, as `seal` wrote it (or plain JSON, as the UI may)."""
    envelope = json.loads(value)
    state = envelope["state"]
    if state.startswith("deflate;"):
        state = zlib.decompress(base64.b64decode(state[len("deflate;"):])).decode()
    return json.loads(state)


def lab_views(tags: dict[str, str]) -> list[str]:
    """The keys of the lab's views among an experiment's tags, newest first."""
    found = []
    for name, value in tags.items():
        if name.startswith(TAG_PREFIX + LAB_PREFIX):
            try:
                created = float(json.loads(value).get("createdAt", 0))
            except (ValueError, TypeError, AttributeError):
                created = 0.0
            found.append((created, name[len(TAG_PREFIX):]))
    return [key for _, key in sorted(found, reverse=True)]


def beyond_kept(tags: dict[str, str], keep: int = KEEP) -> list[str]:
    """The tag names of the lab's views older than its newest `keep`: to delete."""
    return [TAG_PREFIX + key for key in lab_views(tags)[keep:]]


def link(base: str, experiment_id: str, key: str) -> str:
    """The runs page of the experiment opened on the view `key` (on the training view:
    `workflowType=machine_learning`; nothing else, or the UI drops the view)."""
    return f"{base}/#/experiments/{experiment_id}/runs?" + urlencode(
        {"viewStateShareKey": key, "workflowType": "machine_learning"})
