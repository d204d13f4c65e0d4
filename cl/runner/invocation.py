"""Run an experiment file: every run of it over every seed, each one trained by
`cl.runner.one_run` and written to MLflow by `cl.tracking.logger`, under one parent run.

What it has to say (a finished run resumed, a feature cache used, where the results
are) it logs on the `cl` logger; the command line prints it.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cl.config.components import build_stream
from cl.config.models import lab_loads_weights
from cl.config.names import file_name
from cl.config.params import flatten, strategy_arguments
from cl.config.registry import plugins_from
from cl.config.schema import ExperimentConfig
from cl.models import resolve_weights
from cl.runner.one_run import PreparedRun, new_feature_cache, prepare_run, run_config, run_result, saved_state, train_run
from cl.runner.progress import InvocationProgress
from cl.tracking.journal import journal_root
from cl.tracking.logger import ExperimentLogger, TrackingOptions, check_journal
from cl.tracking.provenance import dataset_inputs, source_tags
from cl.tracking.sink import ConsoleSink, interrupts
from cl.tracking.store import DEFAULT_TIMEOUT_S
from cl.runner.distributed import agree
from cl.training.checkpoint import check_replaceable
from cl.training.devices import usable_cores
from cl.training.feature_cache import FeatureCache
from cl.training.nonfinite import NonFiniteLossError
from streams.experience import Stream

log = logging.getLogger(__name__)


def run_experiment(cfg: ExperimentConfig, *, tracking_uri: str | None = None, track: bool = True,
                   progress: bool = False, checkpoint_dir: str | None = None, resume: bool = False,
                   only: list[str] | None = None, seeds: list[int] | None = None,
                   system_metrics_s: float | None = None, log_model: bool = False,
                   tracking_timeout: float = DEFAULT_TIMEOUT_S, parent_key: str | None = None,
                   invocation_id: str | None = None, trial: int | None = None,
                   extra_tags: dict[str, str] | None = None, stream: Stream | None = None,
                   keep: Callable[[PreparedRun, dict], Path | None] | None = None) -> list[dict]:
    """Run every run of `cfg` (or those labelled in `only`) once per seed (`seeds`, else the
    file's `seeds`, else its `seed`); returns one summary dict per run and seed (the `--json`
    fields). Tracked, the invocation is one parent MLflow run holding the comparison, with a
    child run per run and seed (`TrackingOptions` says what the other arguments do). A run
    stopped by a non-finite loss gives {"name", "seed", "status": "FAILED", "error"} and the
    others still run. torch's thread count is `cfg.threads`, else the usable cores, for the
    duration of the call. `stream`: a stream built by the caller instead of the file's (a
    pre-training's joint stream). `keep(run, result)`: called once a run has finished, before
    it is logged, to write what the run keeps of its own (a pre-training's weights file); a
    path it returns is logged with the run under `model/`."""
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
    options = TrackingOptions(uri=tracking_uri, timeout=tracking_timeout, system_metrics_s=system_metrics_s,
                              log_model=log_model, parent_key=parent_key, invocation_id=invocation_id, trial=trial,
                              extra_tags=dict(extra_tags or {})) if track else None
    threads, before = cfg.threads or usable_cores(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with plugins_from(cfg.source_dir):
            return Invocation(cfg, runs, seeds, options, progress and cfg.progress, checkpoint_dir, resume,
                              stream, keep).run()
    finally:
        torch.set_num_threads(before)


class Invocation:
    """One `cl run`: every run of the file over every seed. `options` None: not tracked."""

    def __init__(self, cfg: ExperimentConfig, runs: dict, seeds: list[int], options: TrackingOptions | None,
                 progress: bool, checkpoint_dir: str | None, resume: bool, stream: Stream | None = None,
                 keep: Callable[[PreparedRun, dict], Path | None] | None = None):
        self.cfg, self.runs, self.seeds, self.progress = cfg, runs, seeds, progress
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.given_stream, self.keep = stream, keep
        self.logger = ExperimentLogger(cfg.name, seeds, options, checkpoint_dir, resume) if options is not None else None
        self.source = source_tags(cfg.source_file) if options is not None else {}
        self._features: FeatureCache | None = None  # a frozen backbone's features, for every run of the file
        self.where = InvocationProgress(len(runs) * len(seeds))  # run k of n, and the time left, for the bars

    def features(self) -> FeatureCache:
        if self._features is None:
            self._features = new_feature_cache(self.cfg)
        return self._features

    def checkpoint_path(self, label: str, seed: int) -> Path | None:
        if not self.checkpoint_dir:
            return None
        return Path(self.checkpoint_dir) / f"{file_name(self._run_name(label, seed))}.pt"  # a name is not a path

    def _run_name(self, label: str, seed: int) -> str:
        if self.logger is not None:
            return self.logger.run_name(label, seed)
        return label if len(self.seeds) == 1 else f"{label}-seed{seed}"

    def run(self) -> list[dict]:
        logger = self.logger
        if self.checkpoint_dir and Path(self.checkpoint_dir).exists() and not Path(self.checkpoint_dir).is_dir():
            raise ValueError(f"--checkpoint-dir {self.checkpoint_dir} is a file, not a folder: give a folder "
                             f"(it is made if missing)")
        if self.checkpoint_dir:
            check_writable(Path(self.checkpoint_dir), "--checkpoint-dir", "give --checkpoint-dir a folder you can write")
        elif logger is not None:
            check_writable(journal_root(), "CL_JOURNAL_DIR", "set CL_JOURNAL_DIR to a folder you can write (or give "
                           "--checkpoint-dir, where the journals then live)")
        for label in self.runs:  # before anything trains: no file the lab did not write is replaced
            for seed in self.seeds:
                if self.checkpoint_dir:
                    check_replaceable(self.checkpoint_path(label, seed))
                if logger is not None:
                    check_journal(logger.journal_folder(self._run_name(label, seed)))
        if logger is not None and logger.options.parent_key is None:
            check_journal(logger.parent_folder())
        warmup = logger.open_store() if logger is not None else None
        results, setup_s, stream, stream_seed = [], 0.0, None, None
        try:
            for k, seed in enumerate(self.seeds):
                cfg = self.cfg.with_seed(seed)
                if self.given_stream is not None:
                    stream = self.given_stream
                elif stream is None or cfg.stream_seed != stream_seed:  # a fixed stream seed is built once
                    stream, stream_seed = None, None
                    stream, stream_seed = build_stream(cfg), cfg.stream_seed
                if logger is not None and k == 0:  # the parent opens with the first seed's stream
                    setup_s = logger.wait_for_store(warmup)
                    logger.open_parent(*self._parent_params_and_tags())
                for label, specs in self.runs.items():
                    if interrupts.interrupted:  # an interrupt some library's `except:` swallowed still stops the runs
                        raise KeyboardInterrupt
                    if logger is not None:
                        logger.store_failed()
                    self.where.start(label, seed, len(self.seeds) > 1)
                    results.append(self._run_one(cfg, stream, label, specs))
                    self.where.end(trained=results[-1].get("resumed") != "finished before")
        except BaseException as err:
            try:
                self._close(results, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", announce=False)
            except Exception as closing:  # a full disk refusing the parent's end too: the first error is the one said
                log.debug(f"the parent run could not be closed: {closing}")
            if warmup is not None and not isinstance(err, KeyboardInterrupt):
                warmup.settle()
            raise
        start = time.perf_counter()
        # A parent whose runs failed did not finish what it was asked (and `cl run` exits 1).
        self._close(results, "FAILED" if any(r.get("status") == "FAILED" for r in results) else "FINISHED")
        # Seconds the comparison took to compute, draw and deliver: tracking's cost past the runs'.
        results[0]["comparison_time_s"] = time.perf_counter() - start
        results[0]["tracking_setup_s"] = setup_s
        return results

    def _close(self, results: list[dict], status: str, announce: bool = True) -> None:
        if self.logger is not None:
            self.logger.close_parent(results, status, ",".join(map(str, self.seeds)), announce)

    def _parent_params_and_tags(self) -> tuple[dict, dict]:
        cfg, seeds = self.cfg, ",".join(map(str, self.seeds))
        resolved = cfg.model_dump(mode="json", exclude_none=True, exclude={"runs", "strategies", "seed", "seeds", "sweep"})
        params = {**flatten(resolved), "seeds": seeds, "runs": ",".join(self.runs)}
        tags = {**self.source, "runs": ",".join(self.runs), "seeds": seeds, **stream_tags(cfg)}
        return params, tags

    # ------------------------------------------------------------ one run and seed
    def _run_one(self, cfg: ExperimentConfig, stream, label: str, specs) -> dict:
        wall_start, logger = time.perf_counter(), self.logger
        name, config = self._run_name(label, cfg.seed), run_config(cfg, specs)
        finished = logger.finished_before(name, config) if logger is not None and self.resume else None
        finished = agree(finished)  # on several processes rank 0's journal decides for all
        if finished is not None:
            return finished
        run = prepare_run(cfg, stream, label, specs, self.features)
        checkpoint = self.checkpoint_path(label, cfg.seed)
        state = saved_state(checkpoint, config) if self.resume else None
        if self.resume and state is None:
            again = logger is not None and logger.journal_folder(name).exists()
            log.info(f"no checkpoint of {name} in {self.checkpoint_dir}: it trains from the beginning"
                     + (", into the MLflow run it started before" if again else ""))
        sink = self._child_sink(cfg, stream, label, name, config, run) if logger is not None else None
        sinks = [s for s in (sink, self._console(label, cfg.seed)) if s is not None]
        try:
            record, started = train_run(cfg, run, config, sinks=sinks, progress=self.progress,
                                        progress_label=self.where.label, checkpoint=checkpoint, state=state,
                                        checkpointed=lambda: logger and logger.checkpointed(sink))
            result = {**run_result(label, cfg.seed, record, stream, run.cached, run.strategies, run.cost),
                      "fit_start_unix": started}
            kept = self.keep(run, result) if self.keep is not None else None
        except BaseException as err:
            if logger is not None:
                logger.failed(sink, err)
            if isinstance(err, NonFiniteLossError):  # this run failed; the file's other runs go on
                return {"name": label, "seed": cfg.seed, "status": "FAILED", "error": str(err),
                        "mlflow_run_id": sink.run_id if sink else None,
                        "wall_time_s": time.perf_counter() - wall_start}
            raise
        if sink is not None:
            try:
                logger.finished(sink, result, record, stream, config, f"{cfg.name}: {label}, seed {cfg.seed}",
                                run.model, kept)
            except BaseException as err:  # its artifacts refused (a full disk): the run ends FAILED, not RUNNING
                logger.failed(sink, err)
                raise
        else:
            result["mlflow_run_id"] = None
        result["wall_time_s"] = time.perf_counter() - wall_start
        return result

    def _child_sink(self, cfg: ExperimentConfig, stream, label: str, name: str, config: dict, run):
        tags = {**self.source, **stream_tags(cfg), "strategy": label, "stream": stream.name, "seed": str(cfg.seed),
                "device": str(run.device), "torch_threads": str(torch.get_num_threads())}
        if run.cached:
            tags["feature_cache"] = run.cached["feature_cache"]
        # The strategies as they ran, defaults included: reproducible from MLflow after a default changes.
        params = {**flatten({**config, "strategies": strategy_arguments(config["strategies"])}),
                  "torch_threads": torch.get_num_threads()}
        sink = self.logger.child(name, label, cfg.seed, params, tags, on_gpu=run.device.type == "cuda")
        sink.log_inputs(dataset_inputs(stream, dataset_name(cfg), cfg.data_dir))
        return sink

    def _console(self, label: str, seed: int) -> ConsoleSink | None:
        if not self.progress:
            return None
        return ConsoleSink(label if len(self.seeds) == 1 else f"{label} seed {seed}")


class UnusableFolder(ValueError):
    """A folder the user named (or its default) that the run cannot write in: bad input, exit 2."""


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse, before anything opens or trains, a folder the run would write in and cannot:
    one under a file, read-only, or not the user's to write. Nothing is made: the nearest
    folder that exists takes an empty file, removed at once."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UnusableFolder(f"{what} {folder} cannot be used: {existing} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".cl-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UnusableFolder(f"{what} {folder} cannot be written ({err.strerror}); {fix}") from None


def dataset_name(cfg: ExperimentConfig) -> str:
    return cfg.stream.dataset.name if cfg.stream.dataset else cfg.stream.scenario.name


def stream_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The tags a researcher filters on besides strategy and seed."""
    return {"dataset": dataset_name(cfg), "scenario": cfg.stream.scenario.name, "model": cfg.model.name}
