"""Run an experiment file: one trainer and one MLflow run per compared strategy list."""
from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml

from cl.training.checkpoint import CheckpointError, check_same_config, config_hash, load_checkpoint
from cl.config.components import build_model_from, build_optimizer, build_stream, build_strategies
from cl.config.schema import ExperimentConfig, flatten
from cl.training.feature_cache import FeatureCache, bypass_reason, cache_root, wants_frozen_features
from cl.config.models import lab_loads_weights
from cl.models import resolve_weights
from cl.config.registry import plugins_from
from cl.tracking.provenance import dataset_inputs, source_tags
from cl.tracking import delivery
from cl.tracking.journal import Journal, journal_root
from cl.tracking.store import DEFAULT_TIMEOUT_S, StoreWarmup, TrackingError, check_store_location, is_server, run_link
from cl.tracking.sink import ConsoleSink, MLflowSink
from cl.tracking.deliverer import Deliverer
from cl.training.trainer import LifelongTrainer, NonFiniteLossError, RunRecord, resolve_device
from evaluation import compare, continual, metrics
from evaluation.evaluators import perplexity
from evaluation.report import heatmap_png, matrix_csv, matrix_json, task_curves_png


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def run_experiment(cfg: ExperimentConfig, *, tracking_uri: str | None = None, track: bool = True,
                   progress: bool = False, checkpoint_dir: str | None = None, resume: bool = False,
                   only: list[str] | None = None, seeds: list[int] | None = None,
                   system_metrics_s: float | None = None, log_model: bool = False,
                   tracking_timeout: float = DEFAULT_TIMEOUT_S, parent_key: str | None = None,
                   invocation_id: str | None = None, trial: int | None = None,
                   extra_tags: dict[str, str] | None = None) -> list[dict]:
    """Run every run of `cfg` (or those labelled in `only`) once per seed (`seeds`, else the
    file's `seeds`, else its `seed`); returns one summary dict per run and seed (the `--json`
    fields). Tracked, the invocation is one parent MLflow run holding the comparison, with a
    child run per run and seed. A run stopped by a non-finite loss gives {"name", "seed",
    "status": "FAILED", "error"} and the others still run. torch's thread count is
    `cfg.threads`, else the usable cores, for the duration of the call. `system_metrics_s`:
    sample CPU/GPU use and memory into each child run this often (default: every 10 s on a
    GPU, never on the CPU, where training is the only load worth watching). `log_model`: each
    child run also holds its final model as an MLflow model. `tracking_timeout`: how long the
    store may fail before the user is told what waits in the journals, and how long a run's
    end waits for it. A sweep's trial runs under the sweep's parent (`parent_key`, the key
    of its journal) with the sweep's `invocation_id`, numbered `trial`."""
    runs = cfg.run_specs()
    if only:
        unknown = [label for label in only if label not in runs]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no such run in {cfg.name}; runs: {', '.join(runs)}")
        runs = {label: runs[label] for label in only}
    seeds = list(seeds) if seeds else cfg.run_seeds()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    weights = cfg.model.args.get("weights")
    if weights is not None and lab_loads_weights(cfg.model.name):  # a file that is not there: said before the data loads
        resolve_weights(weights, cfg.model.name)
    threads, before = cfg.threads or usable_cores(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with plugins_from(cfg.source_dir):
            invocation = Invocation(cfg, runs, seeds, tracking_uri if track else None, track,
                                    progress and cfg.progress, checkpoint_dir, resume)
            invocation.system_metrics_s, invocation.log_model = system_metrics_s, log_model
            invocation.timeout, invocation.parent_key, invocation.trial = tracking_timeout, parent_key, trial
            invocation.id = invocation_id or invocation.id
            invocation.extra_tags = dict(extra_tags or {})
            return invocation.run()
    finally:
        torch.set_num_threads(before)


class Invocation:
    """One `cl run`: every run of the file over every seed, under one parent MLflow run.

    Each MLflow run is written through a journal (`cl.tracking.journal`): beside the checkpoints
    (`<run>.journal/`, `parent.journal/`), where a resume finds it, or else under
    `CL_JOURNAL_DIR` (default ./cl-journal), removed once delivered."""

    def __init__(self, cfg, runs, seeds, tracking_uri, track, progress, checkpoint_dir, resume):
        self.cfg, self.runs, self.seeds = cfg, runs, seeds
        self.tracking_uri, self.track, self.progress = tracking_uri, track, progress
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.id = uuid.uuid4().hex[:8]  # tells reruns of one file apart in the store
        self.parent: MLflowSink | None = None
        self.delivery: delivery.DeliveryProcess | None = None  # the delivery child, where there is one
        self.system_metrics_s: float | None = None
        self.log_model = False
        self.timeout = DEFAULT_TIMEOUT_S
        self.parent_key: str | None = None  # a parent opened elsewhere (a sweep's)
        self.extra_tags: dict[str, str] = {}
        self.trial: int | None = None
        self.source = source_tags(cfg.source_file) if track else {}
        self.feature_cache: FeatureCache | None = None  # a frozen backbone's features, for every run of the file

    def run_name(self, label: str, seed: int) -> str:
        name = label if len(self.seeds) == 1 else f"{label}-seed{seed}"
        return name if self.trial is None else f"trial{self.trial}-{name}"

    def checkpoint_path(self, label: str, seed: int) -> Path | None:
        if not self.checkpoint_dir:
            return None
        return Path(self.checkpoint_dir) / f"{self.run_name(label, seed)}.pt"

    def journal_folder(self, name: str) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir) / f"{name}.journal"
        return journal_root() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.cfg.name)}-{self.id}" / f"{name}.journal"

    def run(self) -> list[dict]:
        cfg = self.cfg
        warmup = self._open_store() if self.track else None
        results, setup_s, stream, stream_seed, opened = [], 0.0, None, None, False
        try:
            for seed in self.seeds:
                cfg_s = cfg.with_seed(seed)
                if stream is None or cfg_s.stream_seed != stream_seed:  # a fixed stream seed is built once
                    stream, stream_seed = None, None
                    stream, stream_seed = build_stream(cfg_s), cfg_s.stream_seed
                if self.track and not opened:
                    opened = True
                    if warmup is not None:
                        # Seconds the experiment waited for MLflow's import and store after the data was loaded.
                        setup_s = warmup.wait()
                        self._store_unreachable(None if warmup.unreachable is None
                                                else type(warmup.unreachable).__name__)
                    if self.parent_key is None:  # the parent opens with the first seed's stream
                        self._open_parent()
                for label, specs in self.runs.items():
                    self._store_failed()
                    results.append(self._run_one(cfg_s, stream, label, specs))
        except BaseException as err:
            self._close_parent(results, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        start = time.perf_counter()
        self._close_parent(results, "FINISHED")
        # Seconds the comparison took to compute, draw and deliver: tracking's cost past the runs'.
        results[0]["comparison_time_s"] = time.perf_counter() - start
        results[0]["tracking_setup_s"] = setup_s
        return results

    def _open_store(self) -> StoreWarmup | None:
        """Open the tracking store off the critical path: in the delivery child (`cl.tracking.delivery`)
        where there is one, which reports on it while the runs go on (None is returned), else on
        a thread, waited for once the data is loaded. A local store whose folder cannot be made
        is refused here, before anything trains."""
        check_store_location(self.tracking_uri)
        service = self.delivery = delivery.service(self.tracking_uri, self.timeout)
        if service is None:
            return StoreWarmup(self.tracking_uri, self.timeout)

        told = threading.Lock()  # said once, by whichever comes first: the report or this look

        def reported(uri, report):
            if (uri or "") != (self.tracking_uri or "") or not told.acquire(blocking=False):
                return
            if report.get("unreachable"):
                self._store_unreachable(report["error_type"])
            elif not report.get("ok"):
                print(f"cl: warning: {report['error']}; the runs go on, their records wait in "
                      f"{self.journal_folder('parent').parent} (`cl sync --tracking-uri URI` delivers them "
                      f"to a store that works)", file=sys.stderr)

        service.on_store = reported
        report = service.store_report(self.tracking_uri)
        if report:  # already tried (a rerun in one process): said now
            reported(self.tracking_uri, report)
        return None

    def _store_failed(self) -> None:
        """Before a run trains: a store the delivery child could not open at all stops the
        invocation here, as the thread's wait for it does before the first run (what ran is in
        the journals)."""
        report = self.delivery.store_report(self.tracking_uri) if self.delivery is not None else None
        if report and not report.get("ok") and not report.get("unreachable"):
            raise TrackingError(report["error"])

    def _store_unreachable(self, kind: str | None) -> None:
        if kind is not None:
            print(f"cl: warning: MLflow server {self.tracking_uri} does not answer ({kind}); "
                  f"the runs go on, their records wait in {self.journal_folder('parent').parent} and are "
                  f"delivered when it answers (or by `cl sync`)", file=sys.stderr)

    def _sink(self, name: str, run_name: str, params: dict, tags: dict, parent=None, system_metrics_s=None):
        folder = self.journal_folder(name)
        if folder.exists() and not self.resume:  # an earlier invocation's, in the same checkpoint folder
            aside = folder.with_name(f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            pending = Journal(aside, owner=False)
            if pending.pending:
                print(f"cl: {pending.pending} record(s) of an earlier run wait in {aside}: `cl sync {aside}` "
                      f"delivers them", file=sys.stderr)
            pending.close()
        return MLflowSink(Journal(folder), self.cfg.name, run_name, params, tags,
                          self.tracking_uri, parent=parent, system_metrics_s=system_metrics_s, timeout=self.timeout,
                          remove_when_delivered=not self.checkpoint_dir)

    # ------------------------------------------------------------ the parent run
    def _open_parent(self) -> None:
        cfg = self.cfg
        folder = self.journal_folder("parent")
        if self.resume and folder.exists():  # the resumed invocation keeps its id
            peek = Journal(folder, owner=False)
            created = next((r for r in peek.records if r["op"] == "create"), None)
            peek.close()
            if created is not None:
                self.id = created["tags"].get("cl.invocation", self.id)
        resolved = cfg.model_dump(mode="json", exclude_none=True,
                                  exclude={"runs", "strategies", "seed", "seeds", "sweep"})
        params = {**flatten(resolved), "seeds": ",".join(map(str, self.seeds)), "runs": ",".join(self.runs)}
        tags = {**self.source, "cl.role": "parent", "cl.invocation": self.id, "runs": ",".join(self.runs),
                "seeds": ",".join(map(str, self.seeds)), **_stream_tags(cfg)}
        self.parent = self._sink("parent", f"{cfg.name}-{self.id}", params, tags)

    def _close_parent(self, results: list[dict], status: str) -> None:
        """The comparison over what finished, then the parent's end. A store that fails here
        costs nothing: the records wait in the parent's journal."""
        parent, self.parent = self.parent, None
        if parent is None:
            return
        if status != "FINISHED" and parent.untouched:  # a resume refused before anything ran
            parent.abandon()
            return
        finished = [r for r in results if r.get("status") == "FINISHED"]
        if finished:
            entries = [comparison_entry(r) for r in finished]
            rows = compare.comparison(entries)
            # Step = runs compared: a resumed invocation's fuller comparison is a new point, never a
            # second value at the partial one's step.
            parent.log_metrics(compare.parent_metrics(rows), len(finished), "summary")
            parent.log_table("comparison.json", compare.table_columns(rows))
            table = compare.markdown_table(rows)
            parent.log_artifact("comparison.md", table + "\n")
            # The run's description in the UI: the comparison is the first thing on its page.
            parent.set_tags({"mlflow.note.content": f"**{self.cfg.name}**: mean ± std over seeds "
                             f"{','.join(map(str, self.seeds))}\n\n{table}\n"})
            parent.log_artifact("comparison.csv", compare.csv_table(rows))
            for name, png in compare.comparison_plots(entries, self.cfg.name).items():
                parent.log_artifact(name, png)
        try:
            parent.close(status)
        except TrackingError as err:
            print(f"cl: warning: {err}", file=sys.stderr)
        for r in results:
            r["mlflow_parent_run_id"] = parent.run_id
        if parent.run_id is not None:
            remote = is_server(self.tracking_uri)
            print(f"cl: MLflow: {run_link(self.tracking_uri, parent.experiment_id, parent.run_id)}"
                  + ("" if remote else "  (open it after `cl ui`)"), file=sys.stderr)

    # ------------------------------------------------------------ one child run
    def _run_one(self, cfg, stream, label, specs):
        wall_start = time.perf_counter()
        name = self.run_name(label, cfg.seed)
        resolved = cfg.model_dump(mode="json", exclude_none=True)
        run_config = {k: v for k, v in resolved.items() if k not in ("runs", "strategies", "sweep")}
        run_config["strategies"] = [s.model_dump(mode="json") for s in specs]
        finished = self._finished_before(name, run_config) if self.resume else None
        if finished is not None:
            return finished
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        model = build_model_from(cfg, stream)
        optimizer, scheduler = build_optimizer(cfg, model.to(device))
        strategies = build_strategies(specs)
        # A frozen backbone's run trains on its features, computed once (`cl.training.feature_cache`).
        fit_stream, fit_model, cached = stream, model, {}
        if wants_frozen_features(strategies):
            fit_stream, fit_model, cached = self._frozen_features(cfg, label, strategies, stream, model, device)

        checkpoint = self.checkpoint_path(label, cfg.seed)
        state, meta = (load_checkpoint(checkpoint) if self.resume and checkpoint and checkpoint.exists() else (None, {}))
        if state is not None:
            check_same_config(checkpoint, meta, run_config)
        elif self.resume:
            again = self.track and self.journal_folder(name).exists()
            print(f"cl: no checkpoint of {name} in {self.checkpoint_dir}: it trains from the beginning"
                  + (", into the MLflow run it started before" if again else ""), file=sys.stderr)

        sinks, mlflow_sink = [], None
        if self.track:
            tags = {**self.source, **_stream_tags(cfg), "strategy": label, "stream": stream.name,
                    "seed": str(cfg.seed), "cl.invocation": self.id, "device": str(device),
                    "torch_threads": str(torch.get_num_threads())}
            if cached:
                tags["feature_cache"] = cached["feature_cache"]
            params = {**flatten(run_config), "torch_threads": torch.get_num_threads()}
            every = self.system_metrics_s if self.system_metrics_s is not None else \
                (10.0 if device.type == "cuda" else None)
            if self.trial is not None:
                tags["cl.trial"] = str(self.trial)
            tags.update(self.extra_tags)
            trial = "" if self.trial is None else f"-trial{self.trial}"
            mlflow_sink = self._sink(name, f"{label}{trial}-seed{cfg.seed}-{self.id}", params, tags,
                                     parent=self.parent or self.parent_key, system_metrics_s=every)
            mlflow_sink.log_inputs(dataset_inputs(stream, _dataset_name(cfg), cfg.data_dir))
            sinks.append(mlflow_sink)
        if self.progress:
            sinks.append(ConsoleSink(label if len(self.seeds) == 1 else f"{label} seed {cfg.seed}"))

        trainer = build_trainer(cfg, fit_model, optimizer, scheduler, strategies, device, sinks=sinks,
                                progress=self.progress, checkpoint_path=str(checkpoint) if checkpoint else None)
        if checkpoint is not None:
            # Read when a checkpoint is written: the configuration it belongs to. The journals
            # hold every record emitted up to it, on disk, before it counts as written.
            def checkpoint_meta():
                for sink in (mlflow_sink, self.parent):
                    if sink is not None:
                        sink.checkpointed()
                return {"config": run_config, "config_hash": config_hash(run_config)}

            trainer.checkpoint_meta = checkpoint_meta
        if state is not None:
            trainer.load_state_dict(state)

        # The objects the imports, the data and the model created live as long as the run: freeze
        # them out of the cyclic garbage collector, whose full collections would otherwise walk
        # them again and again during training (tens of milliseconds each).
        gc.freeze()
        fit_start_unix = time.time()  # when training starts (benchmarks/startup.py: the process's cost before it)
        try:
            record = trainer.fit(fit_stream)
        except BaseException as err:
            # What was logged per experience stays in the store; the run is marked as not finished,
            # with the reason as a tag.
            if mlflow_sink is not None:
                mlflow_sink.set_tags({"failure_reason": f"{type(err).__name__}: {err}"[:5000]})
                try:
                    mlflow_sink.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
                except TrackingError as tracking:
                    print(f"cl: warning: {tracking}", file=sys.stderr)  # the training error is the one raised
            if isinstance(err, NonFiniteLossError):  # this run failed; the file's other runs go on
                return {"name": label, "seed": cfg.seed, "status": "FAILED", "error": str(err),
                        "mlflow_run_id": mlflow_sink.run_id if mlflow_sink else None,
                        "wall_time_s": time.perf_counter() - wall_start}
            raise
        finally:
            gc.unfreeze()  # what this run made may be collected again once it is over (the next run freezes anew)

        result = self._result(label, cfg, record, stream)
        result["fit_start_unix"] = fit_start_unix
        if cached:  # the feature passes are the run's training and evaluation forward passes
            result["train_time_s"] += cached.get("feature_train_time_s", 0.0)
            result["eval_time_s"] += cached.get("feature_test_time_s", 0.0)
            result.update(cached)
        if mlflow_sink is not None:
            if self.log_model:
                mlflow_sink.log_model(model)
            self._log_final(mlflow_sink, result, record, stream, run_config, f"{cfg.name}: {label}, seed {cfg.seed}")
        else:
            result["mlflow_run_id"] = None
        result["wall_time_s"] = time.perf_counter() - wall_start
        return result

    def _frozen_features(self, cfg, label, strategies, stream, model, device) -> tuple:
        """For a run whose backbone stays frozen: the stream of its pooled features and the
        model on them (`cl.training.feature_cache`), computed once for every run of the invocation and
        kept on disk, with what that cost; or, where features cannot be kept (augmented
        training data), the stream and model as they are. Either way the run says which."""
        reason = bypass_reason(strategies, stream, model)
        if reason is not None:
            print(f"cl: {label}: frozen backbone, but no feature cache: {reason}", file=sys.stderr)
            return stream, model, {"feature_cache": f"bypassed: {reason}"}
        if self.feature_cache is None:
            self.feature_cache = FeatureCache(cache_root(), batch_size=cfg.training.eval_batch_size)
        # Settings that hold no weights may still change the features (timm's global_pool).
        architecture = json.dumps({"name": cfg.model.name, **{k: v for k, v in cfg.model.args.items()
                                                              if k not in ("weights", "pretrained")}},
                                  sort_keys=True, default=str)
        featured, head, stats = self.feature_cache.featurize(stream, model, device, architecture)
        where = self.feature_cache.root or "memory only"
        print(f"cl: {label}: frozen backbone, trained on cached features ({where}): {stats.rows_computed} rows "
              f"through the backbone, {stats.rows_from_disk} read from disk, {stats.rows_from_memory} from "
              f"earlier runs, {stats.train_time_s + stats.test_time_s:.1f} s", file=sys.stderr)
        return featured, head, {"feature_cache": "used", "feature_rows_computed": stats.rows_computed,
                                "feature_rows_from_disk": stats.rows_from_disk,
                                "feature_rows_from_memory": stats.rows_from_memory,
                                "feature_train_time_s": stats.train_time_s, "feature_test_time_s": stats.test_time_s}

    def _finished_before(self, name: str, run_config: dict) -> dict | None:
        """A run this invocation already finished (its journal ends FINISHED with its result):
        its result, delivering what it has not; it is not trained or logged again. With a
        changed configuration the resume is refused, as a checkpoint's would be."""
        folder = self.journal_folder(name)
        if not self.track or not folder.exists():
            return None
        journal = Journal(folder)
        end = journal.ended
        if end is None or end["status"] != "FINISHED" or "result" not in end:
            journal.close()
            return None
        if end.get("config_hash") not in (None, config_hash(run_config)):
            journal.close()
            raise CheckpointError(f"{folder}: {name} finished with another configuration; resuming it with this "
                                  f"one is refused (run without --resume, or in another --checkpoint-dir)")
        print(f"cl: {name} finished before: its results are kept, it is not run again", file=sys.stderr)
        if journal.pending:
            deliverer = Deliverer(journal, self.tracking_uri, self.parent.journal if self.parent else None)
            if not deliverer.deliver():
                print(f"cl: warning: {deliverer.pending_notice()}", file=sys.stderr)
        journal.close()
        return {**end["result"], "mlflow_run_id": journal.state.get("run_id"), "resumed": "finished before"}

    @staticmethod
    def _result(label, cfg, record, stream) -> dict:
        summary = summarise(record, stream)
        result = {"name": label, "seed": cfg.seed, "status": "FINISHED", **summary,
                  "accuracy_matrix": record.accuracy_matrix.tolist(),
                  "matrices": {k: v.tolist() for k, v in record.matrices.items()},
                  "train_loss": record.train_loss, "loss_terms": record.loss_terms,
                  "train_time_s": record.train_time_s, "eval_time_s": record.eval_time_s,
                  "skipped_steps": record.skipped_steps, "anneal_steps": record.anneal_steps,
                  "rows_trained": record.rows_trained,
                  "iterations": record.iteration, "experience_ends": record.experience_ends,
                  "lr_curve": record.lr_curve, "threads": torch.get_num_threads()}
        if record.task_aware_matrix is not None:
            result["task_aware_matrix"] = record.task_aware_matrix.tolist()
        if stream.is_sequence:  # a language model's throughput: tokens of new data per training second
            result["tokens_trained"] = record.rows_trained * stream.input_shape[0]
            result["tokens_per_s"] = result["tokens_trained"] / max(record.train_time_s, 1e-9)
        curves = continual_curves(record, stream)
        for key, curve in curves.items():
            prefix = "" if key == "acc" else f"{key}_"
            result[f"{prefix}stability_gaps"] = continual.stability_gaps(
                *curve, higher_is_better=record.higher_is_better[key])
        if record.curve:  # the primary score on the seen tasks over iterations, for the comparison plot
            key = next(iter(record.matrices))
            result["seen_curve"] = [[p["iteration"], p[f"{key}_seen"]] for p in record.curve]
        return result

    def _log_final(self, sink, result, record, stream, run_config, title) -> None:
        finish_start, waited = time.perf_counter(), sink.blocked_s
        sink.log_metrics(scalar_metrics(result), len(stream.eval_after), "summary")
        sink.log_artifact("config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        R = record.accuracy_matrix
        sink.log_artifact("accuracy_matrix.csv", matrix_csv(R))
        sink.log_artifact("accuracy_matrix.json", matrix_json(R))
        score = next(iter(record.matrices))
        name = "accuracy" if score == "acc" else score
        sink.log_artifact(f"{'accuracy' if score == 'acc' else score}_matrix.png",
                          heatmap_png(record.matrices[score], title, name))
        sink.log_artifact("task_curves.png", task_curves_png(record.matrices[score], title, name))
        sink.log_artifact("matrices.json", json.dumps(
            {k: {"higher_is_better": record.higher_is_better[k], "matrix": v.tolist()}
             for k, v in record.matrices.items()}))
        if record.curve:
            sink.log_artifact("curve.json", json.dumps(record.curve))
        for key in record.matrices:  # one chart point per boundary
            prefix = "" if key == "acc" else f"{key}_"
            for gap in result.get(f"{prefix}stability_gaps", []):
                sink.log_metrics({f"{prefix}stability_gap_at_boundary": gap["gap"],
                                  f"{prefix}stability_gap_recovery_iters": gap["recovery"] or float("nan")},
                                 gap["boundary"], "summary")
        try:
            result["mlflow_run_id"] = sink.close(result=json_safe(result), config_hash=config_hash(run_config))
        except TrackingError as err:  # the results stand without the store, and wait in the journal
            print(f"cl: warning: {err}", file=sys.stderr)
            result["mlflow_run_id"], result["tracking_error"] = sink.run_id, str(err)
        # What tracking cost this run: waits on the sink while training, plus the final
        # metrics and artifacts (the plots included) and draining the queue.
        result["tracking_time_s"] = waited + time.perf_counter() - finish_start


def json_safe(value):
    """NaN and infinities become None (JSON has no spelling for them), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def scalar_metrics(result: dict) -> dict[str, float]:
    """A run's final scalar metrics (what its summary logs to MLflow), without the None ones."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("seed", "iterations", "threads", "rows_trained", "anneal_steps", "wall_time_s",
                          "tracking_time_s", "tracking_setup_s", "comparison_time_s", "fit_start_unix")}


def comparison_entry(result: dict) -> dict:
    """A finished run's result as `evaluation.compare` takes it."""
    return {"strategy": result["name"], "seed": result["seed"], "metrics": scalar_metrics(result),
            "matrices": result.get("matrices", {}), "curve": result.get("seen_curve"),
            "experience_ends": result.get("experience_ends")}


def _dataset_name(cfg) -> str:
    return cfg.stream.dataset.name if cfg.stream.dataset else cfg.stream.scenario.name


def _stream_tags(cfg) -> dict[str, str]:
    """The tags a researcher filters on besides strategy and seed."""
    return {"dataset": _dataset_name(cfg), "scenario": cfg.stream.scenario.name, "model": cfg.model.name}


def build_trainer(cfg: ExperimentConfig, model, optimizer, scheduler, strategies, device, **extra) -> LifelongTrainer:
    """The trainer of one run, with the file's training settings (`extra`: sinks, progress,
    checkpoint_path)."""
    training = cfg.training
    return LifelongTrainer(
        model, optimizer, strategies, epochs=training.epochs, batch_size=training.batch_size,
        eval_batch_size=training.eval_batch_size, device=device, seed=cfg.seed, scheduler=scheduler,
        scheduler_interval=training.scheduler_interval, scheduler_scope=training.scheduler_scope,
        nonfinite=training.nonfinite, eval_every=training.eval_every, curve_tasks=training.curve_tasks,
        lr_log_every=training.lr_log_every, checkpoint_every=training.checkpoint_every, **extra)


def planned_lrs(cfg: ExperimentConfig, label: str | None = None) -> dict:
    """The LR curve each run of `cfg` (or the run `label`) will follow, without training
    (`LifelongTrainer.planned_lrs`): {label: {"curve": [[iteration, lrs]], "anneals": [...],
    "experience_ends": [...]}}."""
    runs = cfg.run_specs()
    if label is not None:
        if label not in runs:
            raise ValueError(f"no run '{label}' in {cfg.name}; runs: {', '.join(runs)}")
        runs = {label: runs[label]}
    out = {}
    with plugins_from(cfg.source_dir):
        stream = build_stream(cfg)
        for name, specs in runs.items():
            seed_everything(cfg.seed)
            model = build_model_from(cfg, stream)
            optimizer, scheduler = build_optimizer(cfg, model)
            trainer = build_trainer(cfg, model, optimizer, scheduler, build_strategies(specs), torch.device("cpu"))
            curve, anneals, ends = trainer.planned_lrs(stream)
            out[name] = {"curve": curve, "anneals": anneals, "experience_ends": ends}
    return out


def summarise(record: RunRecord, stream) -> dict[str, float | None]:
    """The scalar metrics of every matrix the run recorded, each where the stream supports it
    (`evaluation.metrics.applicable_metrics`): final score, BWT, FWT, forgetting, average
    incremental score, and anytime accuracy when the run evaluated periodically. A loss
    matrix also gives the perplexity of its final row."""
    seen = stream.seen_at_rows
    applicable = metrics.applicable_metrics(stream.rows_follow_tasks, seen)
    out: dict[str, float | None] = {}
    for key, matrix in record.matrices.items():
        out.update(metrics.summary(matrix, key, record.higher_is_better[key], seen, applicable))
    if "loss" in record.matrices:
        out["perplexity"] = float(perplexity(record.matrices["loss"][-1].mean()))
    if record.curve and "acc_seen" in record.curve[0]:
        out["anytime_acc"] = metrics.anytime_accuracy([p["acc_seen"] for p in record.curve])
    for key, curve in continual_curves(record, stream).items():
        out.update(continual.continual_summary(*curve, key=key, higher_is_better=record.higher_is_better[key]))
    return out


def continual_curves(record: RunRecord, stream) -> dict[str, tuple]:
    """Per score, the curve continual evaluation reads (iterations, values, experience ends):
    the periodic evaluations plus the rows taken at each experience's end. Only where the run
    evaluated periodically and each experience trains its own task."""
    if not record.curve or not stream.one_experience_per_task or len(record.experience_ends) != len(stream):
        return {}
    out = {}
    for key, matrix in record.matrices.items():
        points = [(p["iteration"], p[key]) for p in record.curve]
        points += [(end, matrix[k + 1].tolist()) for k, end in enumerate(record.experience_ends)]
        points.sort(key=lambda p: p[0])  # stable: at an experience's end the row comes last
        out[key] = ([p[0] for p in points], [p[1] for p in points], list(record.experience_ends))
    return out
