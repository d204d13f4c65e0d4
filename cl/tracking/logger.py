"""An invocation's MLflow runs: a parent run holding the comparison of every run and seed,
and a child run per run and seed, each written through its journal (`cl.tracking.journal`).

The runner hands it what happened (configurations, records, results); it writes runs,
tables and plots, and never trains anything. Journals live beside the checkpoints
(`<run>.journal/`, `parent.journal/`), where a resume finds them, or else under
`CL_JOURNAL_DIR` (default ./cl-journal), removed once delivered.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cl.config.identity import ConfigChangedError, config_hash
from cl.config.names import file_name
from cl.tracking import delivery
from cl.tracking.deliverer import Deliverer
from cl.tracking.journal import RECORDS, STATE, Journal, journal_root
from cl.tracking.sink import MLflowSink
from cl.tracking import views
from cl.tracking.store import (DEFAULT_TIMEOUT_S, StoreWarmup, TrackingError, check_store_location, is_server,
                              run_link, view_link)
from evaluation import compare
from evaluation.report import heatmap_png, matrix_csv, matrix_json, task_curves_png
from evaluation.summaries import comparison_entry, scalar_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingOptions:
    """Where and how an invocation's runs are tracked. `timeout`: how long the store may fail
    before the user is told what waits in the journals, and how long a run's end waits for it;
    `system_metrics_s`: sample CPU/GPU use into each child this often (None: every 10 s on a
    GPU, never on the CPU); `log_model`: each child holds its final model as an MLflow model.
    A sweep's trials run under the sweep's parent (`parent_key`, the key of its journal) with
    the sweep's `invocation_id`, numbered `trial`, with `extra_tags`."""

    uri: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    system_metrics_s: float | None = None
    log_model: bool = False
    parent_key: str | None = None
    invocation_id: str | None = None
    trial: int | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)


def json_safe(value):
    """NaN and infinities become None (JSON has no spelling for them), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def invocation_journals(experiment: str, invocation: str) -> Path:
    """Where the journals of an invocation without a checkpoint folder go (a sweep's too)."""
    return journal_root() / file_name(f"{experiment}-{invocation}")


def check_journal(folder: Path) -> Path:
    """`folder`, refused if something is there that is not a journal the lab wrote."""
    if folder.is_symlink() or folder.exists() and not (folder.is_dir() and any(
            (folder / f).exists() for f in (RECORDS, STATE, ".owner"))):
        raise TrackingError(f"{folder} exists and is not a journal the lab wrote: move it away or give another "
                            f"--checkpoint-dir")
    return folder


class ExperimentLogger:
    """The MLflow side of one invocation of an experiment file named `experiment`, over
    `seeds`; `checkpoint_dir`, where the journals live beside the checkpoints."""

    def __init__(self, experiment: str, seeds: list[int], options: TrackingOptions,
                 checkpoint_dir: str | None, resume: bool):
        self.experiment, self.seeds, self.options = experiment, seeds, options
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.id = options.invocation_id or uuid.uuid4().hex[:8]  # tells reruns of one file apart in the store
        self.parent: MLflowSink | None = None
        self.delivery: delivery.DeliveryProcess | None = None  # the delivery child, where there is one

    # ------------------------------------------------------------ names
    def run_name(self, label: str, seed: int) -> str:
        name = label if len(self.seeds) == 1 else f"{label}-seed{seed}"
        return name if self.options.trial is None else f"trial{self.options.trial}-{name}"

    def journal_folder(self, name: str) -> Path:
        """The journal of the run called `name` (label, seed, trial); a name is not a path
        (`cl.config.names`), and never the parent's `parent.journal`."""
        return self._journals() / f"{file_name(name, reserved=('parent',))}.journal"

    def parent_folder(self) -> Path:
        return self._journals() / "parent.journal"

    def _journals(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return invocation_journals(self.experiment, self.id)

    # ------------------------------------------------------------ the store
    def open_store(self) -> StoreWarmup | None:
        """Open the tracking store off the critical path: in the delivery child (`cl.tracking.delivery`)
        where there is one, which reports on it while the runs go on (None is returned), else on
        a thread, waited for once the data is loaded (`wait_for_store`). A local store whose
        folder cannot be made is refused here, before anything trains."""
        uri = self.options.uri
        check_store_location(uri)
        service = self.delivery = delivery.service(uri, self.options.timeout)
        if service is None:
            return StoreWarmup(uri, self.options.timeout)
        told = threading.Lock()  # said once, by whichever comes first: the report or this look

        def reported(report_uri, report):
            if (report_uri or "") != (uri or "") or not told.acquire(blocking=False):
                return
            if report.get("unreachable"):
                self._store_unreachable(report["error_type"])
            elif not report.get("ok"):
                log.warning(f"{report['error']}; the runs go on, their records wait in "
                            f"{self._journals()} (`cl sync --tracking-uri URI` delivers them "
                            f"to a store that works)")

        service.on_store = reported
        report = service.store_report(uri)
        if report:  # already tried (a rerun in one process): said now
            reported(uri, report)
        return None

    def wait_for_store(self, warmup: StoreWarmup | None) -> float:
        """Seconds the experiment waited for MLflow's import and store after the data was loaded."""
        if warmup is None:
            return 0.0
        waited = warmup.wait()
        if warmup.unreachable is not None:
            self._store_unreachable(type(warmup.unreachable).__name__)
        return waited

    def store_failed(self) -> None:
        """Before a run trains: a store the delivery child could not open at all stops the
        invocation here, as the thread's wait for it does before the first run (what ran is in
        the journals)."""
        report = self.delivery.store_report(self.options.uri) if self.delivery is not None else None
        if report and not report.get("ok") and not report.get("unreachable"):
            raise TrackingError(report["error"])

    def _store_unreachable(self, kind: str) -> None:
        log.warning(f"MLflow server {self.options.uri} does not answer ({kind}); the runs go on, their records wait "
                    f"in {self._journals()} and are delivered when it answers (or by `cl sync`)")

    # ------------------------------------------------------------ sinks
    def _sink(self, folder: Path, run_name: str, params: dict, tags: dict, parent=None, system_metrics_s=None):
        check_journal(folder)
        if folder.exists() and not self.resume:  # an earlier invocation's, in the same checkpoint folder
            aside = folder.with_name(f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            pending = Journal(aside, owner=False)
            if pending.pending:
                log.info(f"{pending.pending} record(s) of an earlier run wait in {aside}: `cl sync {aside}` delivers them")
            pending.close()
        return MLflowSink(Journal(folder), self.experiment, run_name, params, tags, self.options.uri, parent=parent,
                          system_metrics_s=system_metrics_s, timeout=self.options.timeout,
                          remove_when_delivered=not self.checkpoint_dir)

    def open_parent(self, params: dict, tags: dict) -> None:
        """The parent run (not for a sweep's trials, whose parent is the sweep's); a resumed
        invocation keeps its id."""
        if self.options.parent_key is not None:
            return
        folder = check_journal(self.parent_folder())
        if self.resume and folder.exists():
            peek = Journal(folder, owner=False)
            created = next((r for r in peek.records if r["op"] == "create"), None)
            peek.close()
            if created is not None:
                self.id = created["tags"].get("cl.invocation", self.id)
        tags = {**tags, "cl.role": "parent", "cl.invocation": self.id}
        self.parent = self._sink(self.parent_folder(), f"{self.experiment}-{self.id}", params, tags)

    def child(self, name: str, label: str, seed: int, params: dict, tags: dict, on_gpu: bool) -> MLflowSink:
        """The MLflow run of one run and seed, under the parent."""
        options = self.options
        tags = {**tags, "cl.invocation": self.id, **({"cl.trial": str(options.trial)} if options.trial is not None
                                                      else {}), **options.extra_tags}
        every = options.system_metrics_s if options.system_metrics_s is not None else (10.0 if on_gpu else None)
        trial = "" if options.trial is None else f"-trial{options.trial}"
        return self._sink(self.journal_folder(name), f"{label}{trial}-seed{seed}-{self.id}", params, tags,
                          parent=self.parent or options.parent_key, system_metrics_s=every)

    def checkpointed(self, sink: MLflowSink | None) -> None:
        """A checkpoint is being written: the journals hold every record emitted up to it, on
        disk, before it counts as written."""
        for s in (sink, self.parent):
            if s is not None:
                s.checkpointed()

    # ------------------------------------------------------------ endings
    def failed(self, sink: MLflowSink | None, err: BaseException) -> None:
        """What was logged per experience stays in the store; the run is marked as not
        finished, with the reason as a tag."""
        if sink is None or sink.closed:  # ended already (an interrupt while its delivery was waited for)
            return
        try:
            sink.set_tags({"failure_reason": f"{type(err).__name__}: {err}"[:5000]})
            sink.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except TrackingError as tracking:
            log.warning(str(tracking))  # the training error is the one raised
        except OSError as disk:  # the journal's disk refuses the end too (full): the training error is the one said
            log.debug(f"{sink.journal.folder}: the run's end could not be written: {disk}")

    def finished(self, sink: MLflowSink, result: dict, record, stream, run_config: dict, title: str, model=None,
                 kept: Path | None = None) -> None:
        """A finished run's summary metrics, configuration, matrices and plots (and the file it
        `kept`, under `model/`), then its end; `result` gets `mlflow_run_id` and
        `tracking_time_s` (what tracking cost the run)."""
        finish_start, waited = time.perf_counter(), sink.blocked_s
        if model is not None and self.options.log_model:
            sink.log_model(model)
        if kept is not None:
            sink.log_file(kept, "model")
        # At step 0: MLflow draws a metric no run has past step 0 as a number (a bar in the
        # charts), not as a line of one dot. A run resumed after its summary was journaled keeps
        # that summary: its metrics are the same, and its measurements (peak memory, samples/s)
        # are as true as a second process's; each point is logged once.
        sink.log_metrics(scalar_metrics(result), 0, "summary")
        sink.log_artifact("config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        self._log_matrices(sink, record, title)
        for key in record.matrices:  # one chart point per boundary
            prefix = "" if key == "acc" else f"{key}_"
            for gap in result.get(f"{prefix}stability_gaps", []):
                sink.log_metrics({f"{prefix}stability_gap_at_boundary": gap["gap"],
                                  f"{prefix}stability_gap_recovery_iters": gap["recovery"] or float("nan")},
                                 gap["boundary"], "summary")
        try:
            result["mlflow_run_id"] = sink.close(result=json_safe(result), config_hash=config_hash(run_config))
        except TrackingError as err:  # the results stand without the store, and wait in the journal
            log.warning(str(err))
            result["mlflow_run_id"], result["tracking_error"] = sink.run_id, str(err)
        result["tracking_time_s"] = waited + time.perf_counter() - finish_start

    @staticmethod
    def _log_matrices(sink: MLflowSink, record, title: str) -> None:
        R = record.accuracy_matrix
        sink.log_artifact("accuracy_matrix.csv", matrix_csv(R))
        sink.log_artifact("accuracy_matrix.json", matrix_json(R))
        score = next(iter(record.matrices))
        name = "accuracy" if score == "acc" else score
        sink.log_artifact(f"{name}_matrix.png", heatmap_png(record.matrices[score], title, name))
        sink.log_artifact("task_curves.png", task_curves_png(record.matrices[score], title, name))
        sink.log_artifact("matrices.json", json.dumps(
            {k: {"higher_is_better": record.higher_is_better[k], "matrix": v.tolist()}
             for k, v in record.matrices.items()}))
        if record.curve:
            sink.log_artifact("curve.json", json.dumps(record.curve))

    def finished_before(self, name: str, run_config: dict) -> dict | None:
        """A run this invocation already finished (its journal ends FINISHED with its result):
        its result, delivering what it has not; it is not trained or logged again. With a
        changed configuration the resume is refused, as a checkpoint's would be."""
        folder = check_journal(self.journal_folder(name))
        if not folder.exists():
            return None
        journal = Journal(folder)
        end = journal.ended
        if end is None or end["status"] != "FINISHED" or "result" not in end:
            journal.close()
            return None
        if end.get("config_hash") not in (None, config_hash(run_config)):
            journal.close()
            raise ConfigChangedError(f"{folder}: {name} finished with another configuration; resuming it with this "
                                  f"one is refused (run without --resume, or in another --checkpoint-dir)")
        log.info(f"{name} finished before: its results are kept, it is not run again")
        if journal.pending:
            deliverer = Deliverer(journal, self.options.uri, self.parent.journal if self.parent else None)
            if not deliverer.deliver():
                log.warning(deliverer.pending_notice())
        journal.close()
        return {**end["result"], "mlflow_run_id": journal.state.get("run_id"), "resumed": "finished before"}

    def close_parent(self, results: list[dict], status: str, seeds_text: str, announce: bool = True) -> None:
        """The comparison over what finished, then the parent's end. A store that fails here
        costs nothing: the records wait in the parent's journal. `announce`: say where the
        parent is (not when an error ends the command: its one line is the error's)."""
        parent, self.parent = self.parent, None
        if parent is None:
            return
        if status != "FINISHED" and parent.untouched:  # a resume refused before anything ran
            parent.abandon()
            return
        finished = [r for r in results if r.get("status") == "FINISHED"]
        if finished:
            self._log_comparison(parent, [comparison_entry(r) for r in finished], seeds_text)
        try:
            parent.close(status)
        except TrackingError as err:
            log.warning(str(err))
        for r in results:
            r["mlflow_parent_run_id"] = parent.run_id
        if parent.run_id is not None and announce:
            later = "" if is_server(self.options.uri) else "  (open it after `cl ui`)"
            if finished:  # the runs list on this invocation's view (`cl.tracking.views`): who won, at a glance
                log.info(f"MLflow: {view_link(self.options.uri, parent.experiment_id, views.view_key(parent.run_id))}"
                         + later)
            log.info(f"MLflow parent run: {run_link(self.options.uri, parent.experiment_id, parent.run_id)}" + later)

    @staticmethod
    def _headline(entries: list[dict]) -> str:
        """The table the parent's description leads with: the ranking metric, the difference to
        the best, forgetting and BWT (those that apply), one line a strategy, so that the best
        rows fit in what MLflow shows before "Show more"."""
        from evaluation.metrics import metric_names

        names = metric_names(compare.primary_score(entries))
        present = {k for e in entries for k, v in e["metrics"].items() if isinstance(v, (int, float)) and v == v}
        return compare.markdown_table(compare.comparison(
            entries, [m for m in (names["final"], names["forgetting"], names["bwt"]) if m in present]))

    def _caption(self, rows: list[dict], entries: list[dict], seeds_text: str) -> str:
        """The line under the parent's table: what it compares and how to read it."""
        caption = f"**{self.experiment}** ({self.id}): mean ± std over seeds {seeds_text}, best first"
        note = compare.ranking_note(rows, entries)
        return f"{caption}; {note}." if note else f"{caption}."

    @staticmethod
    def _view_state(rows: list[dict], entries: list[dict]) -> dict:
        """This invocation's view of the runs list: its children ranked as the table ranks the
        strategies, with the comparison's metrics (those that apply to the stream) as columns
        and bars, and the score on the seen tasks per experience."""
        from evaluation.metrics import metric_names

        present = compare.columns_of(rows)
        score = compare.primary_score(entries)
        names = metric_names(score)
        metrics = [m for m in (names["final"], names["forgetting"], names["bwt"]) if m in present]
        ranking, higher = compare.ranking_metric(entries)
        seen = f"{score}_seen" if any(e.get("matrices") for e in entries) else None
        return views.children_state(metrics, ranking, higher, seen, (0.0, 1.0) if score == "acc" else None)

    def _log_comparison(self, parent: MLflowSink, entries: list[dict], seeds_text: str) -> None:
        rows = compare.comparison(entries)
        # At step 0, as a run's summary (`finished`): numbers, not one-dot lines; a resumed
        # invocation's fuller comparison is written again and, being newer, is the one shown.
        parent.log_metrics(compare.parent_metrics(rows), 0, "summary", again=True)
        parent.log_table("comparison.json", compare.table_columns(rows))
        table = compare.markdown_table(rows)
        parent.log_artifact("comparison.md", table + "\n")
        # The run's description: MLflow shows its first 100 pixels until "Show more", so the
        # table leads (its header and the best rows fit), and what it means follows.
        parent.set_tags({"mlflow.note.content": f"{self._headline(entries)}\n\n{self._caption(rows, entries, seeds_text)}"
                                                f" (every metric: comparison.md)\n"})
        parent.save_view(f"cl: {self.experiment}-{self.id}", self._view_state(rows, entries))
        parent.log_artifact("comparison.csv", compare.csv_table(rows))
        for name, png in compare.comparison_plots(entries, self.experiment).items():
            parent.log_artifact(name, png)
