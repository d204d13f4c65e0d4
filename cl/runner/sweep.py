"""`cl sweep FILE`: run the points of a file's `sweep:` block, on Ray Tune or one after another.

Every trial is the file with the point's keys set, scored on a validation split carved
from each experience's training data (`stream.validation`), so choosing never sees a
test set. `protocol: whole_stream` still tunes on every task of the stream;
`protocol: first_experiences` tunes on the first k experiences only, which does not
peek at the tasks to come. Either way the chosen point (the best mean objective over the
swept seeds) then runs on the whole stream and its test sets (`final_run`).

Each trial is a child MLflow run under one parent holding the sweep's table. With Ray
(`pip install "cl-lab[ray]"`) trials run in parallel as Tune trials, locally or on a
cluster (`--address`); a failed trial is reported and the others go on.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
import uuid
from pathlib import Path

import yaml

from cl.config.errors import ConfigError
from cl.config.files import load_experiment
from cl.config.schema import ExperimentConfig, SweepConfig, SweepRange

log = logging.getLogger(__name__)

#: The points a sweep may have unless the user raises it (`cl sweep --max-points N`).
MAX_POINTS = 1000


def count_points(sweep: SweepConfig) -> int:
    """How many points `expand` makes, counted without making them."""
    return math.prod(len(v) for v in sweep.parameters.values()) if sweep.method == "grid" else sweep.samples


def objective_names() -> set[str]:
    """Every scalar a trial can report, whatever its stream: each evaluator's metrics
    (`evaluation.summaries`) and the run's costs; an objective outside them chooses nothing."""
    from evaluation import continual, metrics
    from evaluation.evaluators import Evaluator

    names = {"perplexity", "anytime_acc", "train_time_s", "eval_time_s", "skipped_steps", "tokens_per_s",
             "tokens_trained", "rows_trained", "iterations"}
    for key in {cls.key for cls in Evaluator.__subclasses__() if cls.key}:
        names |= set(metrics.metric_names(key).values())
        names |= set(continual.continual_summary([1, 2], [[1.0], [1.0]], [2], key=key))  # their names only
    return names


def check_sweep(sweep: SweepConfig, source: str, max_points: int) -> int:
    """The sweep's point count, once its objective is known to be a metric and the count is
    within `max_points`; a ConfigError before any point is made or run otherwise."""
    if sweep.objective not in objective_names():
        raise ConfigError(f"{source}: sweep.objective: '{sweep.objective}' is not a metric a trial reports "
                          f"(expected one of: {', '.join(sorted(objective_names()))})")
    n = count_points(sweep)
    if n > max_points:
        raise ConfigError(f"{source}: the sweep has {n:,} points, over the limit of {max_points:,}; "
                          f"run it with --max-points {n} to allow them")
    return n


def expand(sweep: SweepConfig) -> list[dict]:
    """The points of a sweep, each {config key: value}: the grid's product in order, or
    `samples` random draws (values chosen uniformly, ranges uniformly or log-uniformly)."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return [dict(zip(keys, values)) for values in itertools.product(*(sweep.parameters[k] for k in keys))]
    rng = random.Random(sweep.seed)
    points = []
    for _ in range(sweep.samples):
        point = {}
        for k in keys:
            spec = sweep.parameters[k]
            if isinstance(spec, SweepRange):
                lo, hi = (math.log(spec.low), math.log(spec.high)) if spec.log else (spec.low, spec.high)
                v = rng.uniform(lo, hi)
                v = math.exp(v) if spec.log else v
                point[k] = round(v) if spec.integer else v
            else:
                point[k] = rng.choice(spec)
        points.append(point)
    return points


def overrides_of(point: dict) -> list[str]:
    """A point as `--set` overrides (values in YAML, as on the command line)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in point.items()]


def trial_overrides(sweep: SweepConfig, point: dict) -> list[str]:
    extra = [f"stream.validation={sweep.validation}"]
    if "seed" in point:
        extra.append("seeds=null")  # the swept seed, not the file's list of seeds
    if sweep.protocol == "first_experiences":
        extra.append(f"stream.first_experiences={sweep.first_experiences}")
    return overrides_of(point) + extra


def run_trial(spec: dict) -> dict:
    """One trial, in this process: {"trial", "point", "results"} or {"trial", "point", "error"}.
    Also the body of a Ray Tune trial (`spec` travels as plain data)."""
    from cl.runner.invocation import run_experiment

    if spec.get("journal_dir"):
        os.environ["CL_JOURNAL_DIR"] = spec["journal_dir"]
    try:
        cfg = load_experiment(spec["file"], spec["overrides"])
        results = run_experiment(cfg, tracking_uri=spec["tracking_uri"], track=spec["track"], progress=False,
                                 parent_key=spec["parent_key"], invocation_id=spec["invocation"],
                                 trial=spec["trial"])
        keep = ("name", "seed", "status", "error", "mlflow_run_id", "accuracy_matrix", "train_time_s")
        slim = [{k: v for k, v in r.items() if k in keep or isinstance(v, (int, float)) and not isinstance(v, bool)}
                for r in results]
        return {"trial": spec["trial"], "point": spec["point"], "results": slim}
    except Exception as err:  # a failed trial is reported; the others go on
        return {"trial": spec["trial"], "point": spec["point"], "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}


def _tune_trial(config: dict) -> None:
    from ray import tune

    out = run_trial(config["spec"])  # a failed trial reports its error too: the others go on
    tune.report({"outcome": json.dumps(out, default=str)})  # back to the driver, from any node


def run_points(specs: list[dict], workers: int, use_ray: bool, address: str | None, cpus: float,
               gpus: float) -> list[dict]:
    """Every trial's outcome, in trial order: on Ray Tune, or one after another here."""
    if not use_ray:
        return [run_trial(spec) for spec in specs]
    import ray
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # relative paths in the file keep their meaning
    ray.init(address=address, num_cpus=None if address else max(1, int(workers * cpus)), include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
    try:
        storage = tempfile.mkdtemp(prefix="cl-sweep-")
        tuner = tune.Tuner(
            tune.with_resources(_tune_trial, {"cpu": cpus, "gpu": gpus}),
            param_space={"spec": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(storage_path=storage, name="cl-sweep", verbose=0))
        with contextlib.redirect_stdout(sys.stderr):  # Tune's tables; standard output is the sweep's
            grid = tuner.fit()
        reported = {}
        for result in grid:
            out = json.loads(result.metrics["outcome"]) if result.metrics and "outcome" in result.metrics else None
            if out is not None:
                reported[out["trial"]] = out
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return [reported.get(spec["trial"], {"trial": spec["trial"], "point": spec["point"],
                                         "error": "the Ray trial died before reporting"}) for spec in specs]


def choose(outcomes: list[dict], sweep: SweepConfig) -> tuple[list[dict], dict | None]:
    """Rows per (point without its seed, run label): mean ± std of the objective over seeds;
    and the best row."""
    from evaluation.compare import mean_std

    groups: dict[tuple, dict] = {}
    for out in outcomes:
        point = {k: v for k, v in out["point"].items() if k != "seed"}
        for r in out.get("results", []):
            key = (json.dumps(point, sort_keys=True), r["name"])
            row = groups.setdefault(key, {"point": point, "run": r["name"], "values": [], "seeds": [], "trials": []})
            row["values"].append(r.get(sweep.objective, math.nan) if r.get("status") == "FINISHED" else math.nan)
            row["seeds"].append(r.get("seed"))
            row["trials"].append(out["trial"])
    rows = []
    for row in groups.values():
        values = row.pop("values")
        mean, std = mean_std(values)
        # A point that failed (diverged) on any seed is not chosen on its surviving seeds.
        rows.append({**row, "mean": mean, "std": std, "complete": all(math.isfinite(v) for v in values)})
    seeds_swept = max((len(r["seeds"]) for r in rows), default=0)
    finite = [r for r in rows if r["complete"] and len(r["seeds"]) == seeds_swept]
    best = (max if sweep.mode == "max" else min)(finite, key=lambda r: r["mean"]) if finite else None
    return rows, best


def sweep_table(rows: list[dict], objective: str) -> str:
    keys = sorted({k for r in rows for k in r["point"]})
    out = ["| run | " + " | ".join(keys) + f" | seeds | {objective} (validation) |",
           "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    for r in rows:
        cell = "-" if not math.isfinite(r["mean"]) else f"{r['mean']:.4f}" + (
            f" ± {r['std']:.4f}" if math.isfinite(r["std"]) else "")
        if math.isfinite(r["mean"]) and not r.get("complete", True):
            cell += " (failed on some seed: not chosen)"
        out.append(f"| {r['run']} | " + " | ".join(str(r["point"].get(k, "")) for k in keys)
                   + f" | {','.join(map(str, r['seeds']))} | {cell} |")
    return "\n".join(out)


def sweep(path: str, overrides: list[str], *, tracking_uri: str | None, track: bool, workers: int = 2,
          ray: bool | None = None, address: str | None = None, cpus_per_trial: float = 1.0,
          gpus_per_trial: float = 0.0, max_points: int = MAX_POINTS) -> dict:
    """Run the sweep of the file at `path`; returns {"trials", "rows", "best", "final"}."""
    from cl.tracking.journal import journal_root

    cfg: ExperimentConfig = load_experiment(path, overrides)
    if cfg.sweep is None:
        raise ValueError(f"{path}: no 'sweep:' block to run (cl run runs the file as it is)")
    check_sweep(cfg.sweep, path, max_points)
    if track:  # the parent's journal and the trials' live there: refused before anything opens
        from cl.runner.invocation import check_writable

        check_writable(journal_root(), "CL_JOURNAL_DIR", "set CL_JOURNAL_DIR to a folder you can write")
    use_ray = _ray_wanted(ray)
    points = expand(cfg.sweep)
    invocation = uuid.uuid4().hex[:8]
    parent = _open_sweep_parent(cfg, points, invocation, tracking_uri) if track else None
    parent_key = parent.journal.state["key"] if parent is not None else None
    pinned = _ray_trial_overrides(cfg, use_ray, cpus_per_trial, gpus_per_trial)
    specs = [{"file": str(Path(path).resolve()), "overrides": overrides + pinned + trial_overrides(cfg.sweep, point),
              "point": point, "trial": n, "tracking_uri": tracking_uri, "track": track, "parent_key": parent_key,
              "invocation": invocation, "journal_dir": str(journal_root().resolve())}
             for n, point in enumerate(points)]
    log.info(f"{cfg.name}: {len(points)} point(s), {'on Ray, ' + str(workers) + ' at a time' if use_ray else 'here'}; "
             f"objective {cfg.sweep.objective} on a {cfg.sweep.validation:.0%} validation split"
             + (f" of the first {cfg.sweep.first_experiences} experiences" if cfg.sweep.protocol == "first_experiences"
                else ""))
    outcomes = run_points(specs, workers, use_ray, address, cpus_per_trial, gpus_per_trial)
    _report_trial_failures(outcomes, cfg.sweep.objective)
    rows, best = choose(outcomes, cfg.sweep)
    final = None
    try:
        if best is not None and cfg.sweep.final_run:
            final = _run_chosen_point(path, overrides, best, tracking_uri, track, parent_key, invocation)
    finally:
        if parent is not None:
            _close_sweep_parent(parent, cfg, points, rows, best, final, outcomes)
    return {"trials": outcomes, "rows": rows, "best": best, "final": final, "ray": use_ray,
            "objective": cfg.sweep.objective,
            "mlflow_parent_run_id": parent.run_id if parent is not None else None}


def _ray_wanted(ray: bool | None) -> bool:
    """Whether the trials run on Ray: `ray=None` uses it where it is installed, `True` insists on it."""
    if ray is not None and not ray:
        return False
    try:
        import ray as _  # noqa: F401
        return True
    except ImportError:
        if ray:
            raise ValueError('--ray needs Ray: pip install "cl-lab[ray]"') from None
        log.info('Ray is not installed (pip install "cl-lab[ray]"): the points run one after another here')
        return False


def _open_sweep_parent(cfg: ExperimentConfig, points: list[dict], invocation: str, tracking_uri: str | None):
    """The parent MLflow run the trials are children of (its journal is delivered, then removed)."""
    from cl.tracking.journal import Journal
    from cl.tracking.logger import invocation_journals
    from cl.tracking.sink import MLflowSink
    from cl.tracking.store import StoreWarmup

    folder = invocation_journals(cfg.name, invocation).resolve()  # the trials' folder; a name is not a path
    StoreWarmup(tracking_uri).wait()
    return MLflowSink(Journal(folder / "parent.journal"), cfg.name, f"{cfg.name}-sweep-{invocation}",
                      {"points": len(points), "method": cfg.sweep.method, "protocol": cfg.sweep.protocol,
                       "objective": cfg.sweep.objective, "validation": cfg.sweep.validation},
                      {"cl.role": "parent", "cl.invocation": invocation, "cl.sweep": "true"}, tracking_uri,
                      remove_when_delivered=True)


def _ray_trial_overrides(cfg: ExperimentConfig, use_ray: bool, cpus_per_trial: float,
                         gpus_per_trial: float) -> list[str]:
    """Overrides every Ray trial gets, with a warning where Ray changes what a trial trains on."""
    pinned = []
    if use_ray and cfg.threads is None:  # a trial's torch threads are its CPUs, not the machine's cores
        pinned = [f"threads={max(1, int(cpus_per_trial))}"]
        log.info(f"trials on Ray run on {max(1, int(cpus_per_trial))} thread(s) each; pin 'threads:' in the file for "
                 f"results equal to one after another")
    if use_ray and not gpus_per_trial:
        import torch

        if torch.cuda.is_available():
            log.warning("--gpus-per-trial 0: Ray hides the GPUs from the trials, which train on the CPU")
    return pinned


def _report_trial_failures(outcomes: list[dict], objective: str) -> None:
    """Each failed trial, and an objective that no trial reports (a typo chooses nothing), on stderr."""
    for out in outcomes:
        if "error" in out:
            log.warning(f"trial {out['trial']} {overrides_of(out['point'])} failed: {out['error']}")
    reported = {k for out in outcomes for r in out.get("results", []) for k in r}
    if reported and objective not in reported:
        log.error(f"the objective '{objective}' is not a metric of the trials; they report: "
                  f"{', '.join(sorted(k for k in reported if k not in ('name', 'status', 'error')))}")


def _run_chosen_point(path: str, overrides: list[str], best: dict, tracking_uri: str | None, track: bool,
                      parent_key: str | None, invocation: str) -> list[dict]:
    """The chosen point's run on the whole stream and its test sets, at the seeds it was tuned on."""
    from cl.runner.invocation import run_experiment

    seeds = sorted({s for s in best["seeds"] if s is not None}) or None
    final_cfg = load_experiment(path, overrides + overrides_of(best["point"]))
    return run_experiment(final_cfg, tracking_uri=tracking_uri, track=track, progress=False, seeds=seeds,
                          only=[best["run"]], parent_key=parent_key, invocation_id=invocation,
                          extra_tags={"cl.sweep_final": "true"})


def _close_sweep_parent(parent, cfg, points, rows, best, final, outcomes) -> None:
    """The sweep's table, the chosen point and its test accuracy, into the parent; then its end."""
    table = sweep_table(rows, cfg.sweep.objective)
    note = f"**{cfg.name}** sweep: {len(points)} points, {cfg.sweep.protocol}\n\n{table}\n"
    if best is not None:
        note += f"\nchosen: {best['run']} {best['point']}\n"
        parent.set_tags({"best_point": json.dumps(best["point"]), "best_run": best["run"]})
        parent.log_metrics({f"best_{cfg.sweep.objective}_validation": best["mean"]}, 0)
    if final:
        finished = [r for r in final if r.get("status") == "FINISHED"]
        if finished:
            from evaluation.compare import mean_std

            mean, std = mean_std([r["acc"] for r in finished if "acc" in r])
            parent.log_metrics({"final_acc_mean": mean, **({"final_acc_std": std} if math.isfinite(std) else {})},
                               0)
            note += f"\non the test sets, whole stream: acc {mean:.4f}" + (
                f" ± {std:.4f}" if math.isfinite(std) else "") + "\n"
    parent.set_tags({"mlflow.note.content": note})
    parent.log_artifact("sweep.md", table + "\n")
    parent.log_artifact("sweep.json", json.dumps({"rows": rows, "best": best, "outcomes": outcomes}, default=str))
    try:
        parent.close("FINISHED" if final is not None or best is None or not cfg.sweep.final_run else "FAILED")
    except Exception as err:
        log.warning(str(err))
