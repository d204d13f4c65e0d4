"""Command line: `cl run FILE`, `cl pretrain FILE`, `cl compare`, `cl ui`, `cl describe FILE`, `cl schedules FILE`, `cl streams`,
`cl strategies`, `cl models`, `cl datasets`."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path


def _tracking_uri_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cl", description="Continual-learning lab: run experiments, track them in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate and run an experiment file")
    run.add_argument("file", help="experiment YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set seed=1 --set training.optimizer.lr=0.1 (repeatable)")
    run.add_argument("--json", action="store_true", help="end standard output with one JSON object of the results")
    _tracking_uri_option(run)
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--checkpoint-dir", default=None, help="save each run's state after every experience here")
    run.add_argument("--resume", action="store_true", help="continue runs from their checkpoints in --checkpoint-dir")
    run.add_argument("--only", default=None, metavar="LABEL[,LABEL]",
                     help="of a file that compares several runs, run only these")
    run.add_argument("--system-metrics", type=float, default=None, metavar="SECONDS",
                     help="log CPU/GPU use and memory to each run every SECONDS (default: 10 on a GPU, off on the CPU)")
    run.add_argument("--tracking-timeout", type=float, default=None, metavar="SECONDS",
                     help="how long the store may fail before you are told what waits in the journal, and how "
                          "long a run's end waits for it (default 5, or CL_TRACKING_TIMEOUT)")
    run.add_argument("--log-model", action="store_true",
                     help="also log each run's final model as an MLflow model (runs:/<run id>/model)")
    run.add_argument("--seeds", default=None, metavar="S[,S]",
                     help="run every run of the file once per seed, e.g. --seeds 0,1,2 (the file's 'seeds')")
    pre = sub.add_parser("pretrain", help="train a backbone supervised on a dataset (or some of its classes) and "
                                          "save its weights for experiments (model.weights)")
    pre.add_argument("file", help="pre-training YAML file")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set training.epochs=2 --set output=/tmp/w.safetensors")
    pre.add_argument("--json", action="store_true", help="end standard output with one JSON object of the results")
    _tracking_uri_option(pre)
    pre.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    pre.add_argument("--no-progress", action="store_true", help="no line per epoch")
    pre.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    for name in ("strategies", "models", "datasets", "scenarios"):
        listing = sub.add_parser(name, help=f"list the registered {name}, or show one in full")
        listing.add_argument("name", nargs="?", help="show this one: its description, paper and arguments")
    sub.add_parser("streams", help="list the registered scenarios and stream options, one line each")
    describe = sub.add_parser("describe", help="print the stream an experiment file builds, without training")
    describe.add_argument("file", help="experiment YAML file")
    describe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    describe.add_argument("--json", action="store_true", help="print the description as JSON")
    schedules = sub.add_parser("schedules", help="print (and plot) the LR curve an experiment file's runs will "
                                                 "follow over the whole stream, without training")
    schedules.add_argument("file", help="experiment YAML file")
    schedules.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    schedules.add_argument("--only", default=None, metavar="LABEL", help="only this run of the file")
    schedules.add_argument("--plot", default=None, metavar="PNG", help="also draw the curves into this image")
    schedules.add_argument("--points", type=int, default=12, help="iterations printed per experience (default 12)")
    schedules.add_argument("--json", action="store_true", help="print every iteration's LRs as JSON")
    compare = sub.add_parser("compare", help="read runs back from an MLflow store and print their comparison: "
                                             "mean ± std over seeds per strategy")
    compare.add_argument("experiment", nargs="?", help="MLflow experiment name (the file's 'name')")
    compare.add_argument("--parent", default=None, metavar="RUN_ID", help="the children of this parent run")
    compare.add_argument("--filter", default="", metavar="FILTER",
                         help="an MLflow filter string, e.g. \"tags.dataset = 'mnist' and params.training.epochs = '1'\"")
    compare.add_argument("--metrics", default=None, metavar="M[,M]", help="columns (default: ACC, BWT, FWT, ...)")
    compare.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    compare.add_argument("--plots", default=None, metavar="DIR", help="also write the comparison plots here")
    _tracking_uri_option(compare)
    ui = sub.add_parser("ui", help="serve the MLflow UI on the lab's store and print each experiment's link")
    _tracking_uri_option(ui)
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--experiment", default=None, help="print only this experiment's link")
    sweep = sub.add_parser("sweep", help="run the points of a file's sweep: block (grid or random) on Ray Tune, "
                                         "or one after another; choose on a validation split")
    sweep.add_argument("file", help="experiment YAML file with a sweep: block")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--workers", type=int, default=2, help="trials at once on Ray (default 2)")
    sweep.add_argument("--no-ray", action="store_true", help="run the points one after another in this process")
    sweep.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1.0)
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0)
    _tracking_uri_option(sweep)
    sweep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sweep.add_argument("--json", action="store_true", help="end standard output with one JSON object")
    sync = sub.add_parser("sync", help="deliver the tracking records that wait in journals to their MLflow stores")
    sync.add_argument("folders", nargs="*", help="journal folders, or folders holding them: checkpoint folders, "
                                                 "./cl-journal (default: CL_JOURNAL_DIR, else ./cl-journal)")
    sync.add_argument("--tracking-uri", default=None, help="deliver here instead of the store each run names")
    for command in (run, describe, schedules, compare, ui, sync, sweep, pre):  # `cl run FILE --debug` as well as `cl --debug run FILE`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error, not just its message")
    return p


def _registry(kind: str):
    from cl.config.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES

    return {"strategies": STRATEGIES, "models": MODELS, "datasets": DATASETS, "scenarios": SCENARIOS}[kind]


def _list(kind: str, name: str | None = None) -> int:
    registry = _registry(kind)
    if name is not None:
        return _show(kind, name, registry.get(name))
    for name, obj in registry.items().items():
        print(f"{name:<20} {_summary(obj.__doc__)}")
    if kind == "models":
        print(f"{'<timm name>':<20} any timm model, e.g. vit_tiny_patch16_224 (pretrained: true, or weights: FILE)")
    return 0


def _show(kind: str, name: str, obj) -> int:
    """One component in full: its docstring (the paper and equation), its arguments with
    their types and defaults, and where it is defined."""
    import inspect
    import textwrap

    from cl.config.schema import MODEL_INJECTED, SCENARIO_INJECTED

    injected = {"models": MODEL_INJECTED, "scenarios": SCENARIO_INJECTED, "datasets": {"data_dir"}}.get(kind, set())
    print(name)
    print(textwrap.indent(inspect.cleandoc(obj.__doc__ or "(no description)"), "  "))
    print("arguments:")
    shown = 0
    for p in inspect.signature(obj).parameters.values():
        if p.name in injected or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = "" if p.annotation is p.empty else f": {_annotation(p.annotation)}"
        default = " (required)" if p.default is p.empty else f" = {p.default!r}"
        print(f"  {p.name}{hint}{default}")
        shown += 1
    if not shown:
        print("  (none)")
    try:
        print(f"defined in {inspect.getsourcefile(obj)}")
    except TypeError:
        pass
    return 0


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring, on one line."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)\.(?=\s+[A-Z`(]|$)", text)  # "et al." does not end a sentence
    return text if end is None else text[: end.start() + 1]


def _streams() -> int:
    _list("scenarios")
    print(f"{'(stream) blurry':<20} share of each experience handed to the next one (blurry boundaries)")
    print(f"{'(stream) online':<20} {{experience_size: N}}: cut every experience into small ones, seen once each")
    return 0


def _schedules(args) -> int:
    from cl.config.schema import load_experiment
    from cl.runner.invocation import planned_lrs

    cfg = load_experiment(args.file, args.overrides)
    plans = planned_lrs(cfg, args.only)
    if args.json:
        print(json.dumps(plans))
        return 0
    for label, plan in plans.items():
        curve, ends = plan["curve"], plan["experience_ends"]
        print(f"{label}: {len(curve)} iterations; LR of each parameter group")
        start = 0
        for k, end in enumerate(ends):
            n = end - start
            picks = sorted({start + round(i * (n - 1) / max(args.points - 1, 1)) for i in range(min(args.points, n))})
            for i in picks:
                lrs = " ".join(f"{lr:.3e}" for lr in curve[i][1])
                print(f"  experience {k + 1:>3}  iteration {curve[i][0]:>7}  {lrs}")
            for anneal in plan["anneals"]:
                if anneal["after_experience"] == k:
                    a = anneal["lrs"]
                    print(f"  anneal on a copy after experience {k + 1}: {len(a)} steps, "
                          f"{a[0][0]:.3e} -> {a[-1][0]:.3e} (evaluated; training continues from the constant LR)")
            start = end
    if args.plot:
        _plot_lrs(plans, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _plot_lrs(plans: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for label, plan in plans.items():
        its = [p[0] for p in plan["curve"]]
        line, = ax.plot(its, [p[1][0] for p in plan["curve"]], label=label, linewidth=1.2)
        for anneal in plan["anneals"]:  # dotted: the anneals trained on copies
            x0 = anneal["iteration"]
            ax.plot(range(x0, x0 + len(anneal["lrs"])), [lr[0] for lr in anneal["lrs"]], ":", color=line.get_color())
    for end in next(iter(plans.values()))["experience_ends"][:-1]:
        ax.axvline(end, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate (group 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _describe(args) -> int:
    from cl.config.components import build_stream
    from cl.config.schema import load_experiment

    cfg = load_experiment(args.file, args.overrides)
    stream = build_stream(cfg)
    info = stream.describe()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['name']}: {info['n_experiences']} experiences, {info['n_tasks']} test sets, "
          f"{info['n_classes']} classes, input {tuple(info['input_shape'])}")
    print(f"class order: {info['class_order']}")
    # Experiences are numbered from 1 wherever a person reads them (progress lines, MLflow steps).
    print(f"evaluated after experiences: {_ranges([i + 1 for i in info['eval_after']])}")
    print(f"{'exp':>5} {'task_label':>10} {'tasks':>7} {'n_train':>8}  classes")
    shown = info["experiences"] if len(info["experiences"]) <= 40 else info["experiences"][:20] + [None] + \
        info["experiences"][-20:]
    for e in shown:
        if e is None:
            print(f"{'...':>5}")
            continue
        tasks = "+".join(map(str, e["tasks"])) or "-"  # the tasks whose samples it holds, its own first
        print(f"{e['index'] + 1:>5} {e['task_label']:>10} {tasks:>7} {e['n_train']:>8}  {e['classes']}")
    print("test sets: " + ", ".join(f"task{t['task']} {t['classes']} n={t['n_test']}" for t in info["test_sets"]))
    schedule = {k: v for k, v in info["schedule"].items() if k not in ("focus", "recurrences")}
    if schedule:
        print(f"schedule: {json.dumps(schedule)}")
    if "recurrences" in info["schedule"]:
        print(f"recurrences of earlier tasks: {len(info['schedule']['recurrences'])} "
              f"over {len(info['schedule']['focus'])} phases")
    return 0


def _ranges(values: list[int]) -> str:
    if len(values) <= 12:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:6])) + f", ... ({len(values)} in all) ..., " + ", ".join(map(str, values[-3:]))


def _compare(args) -> int:
    from cl.tracking.browse import entries, find_runs
    from cl.tracking.store import default_tracking_uri
    from evaluation import compare

    uri = args.tracking_uri or default_tracking_uri()
    runs = find_runs(uri, args.experiment, args.parent, args.filter)
    if not runs:
        print("cl: no finished runs match", file=sys.stderr)
        return 1
    found = entries(runs, with_artifacts=bool(args.plots), tracking_uri=uri)
    rows = compare.comparison(found, args.metrics.split(",") if args.metrics else None)
    print({"text": compare.text_table, "markdown": compare.markdown_table, "csv": compare.csv_table}[args.format](rows)
          .rstrip("\n"))
    if args.plots:
        from pathlib import Path

        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in compare.comparison_plots(found, args.experiment or f"children of {args.parent}").items():
            (folder / name).write_bytes(png)
            print(f"plot: {folder / name}", file=sys.stderr)
    return 0


def _sweep(args) -> int:
    from cl.runner.invocation import json_safe
    from cl.runner.sweep import sweep, sweep_table
    from cl.tracking.store import default_tracking_uri

    out = sweep(args.file, args.overrides, tracking_uri=args.tracking_uri or default_tracking_uri(),
                track=not args.no_track, workers=args.workers, ray=False if args.no_ray else None,
                address=args.address, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    objective = out["objective"]
    print(sweep_table(out["rows"], objective))
    if out["best"] is not None:
        print(f"chosen: {out['best']['run']} {out['best']['point']} "
              f"({objective} on validation {out['best']['mean']:.4f})")
    if out["final"]:
        from evaluation.report import results_table

        print("the chosen point on the whole stream, test sets:")
        print(results_table(out["final"], show_seed=True))
    if args.json:
        print(json.dumps(json_safe(out), allow_nan=False, default=str))
    return 1 if any("error" in t for t in out["trials"]) else 0


def _sync(args) -> int:
    from cl.tracking.sync import sync

    return sync(args.folders, args.tracking_uri)


def _ui(args) -> int:
    from cl.tracking.browse import serve_ui
    from cl.tracking.store import default_tracking_uri

    return serve_ui(args.tracking_uri or default_tracking_uri(), args.port, args.experiment)


def _run(args) -> int:
    from cl.config.schema import load_experiment
    from cl.runner.invocation import run_experiment
    from cl.tracking.store import default_tracking_uri
    from evaluation.report import results_table

    start = time.perf_counter()
    cfg = load_experiment(args.file, args.overrides)
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    seeds = _seeds(args.seeds) if args.seeds else cfg.run_seeds()
    runs = run_experiment(cfg, tracking_uri=args.tracking_uri or default_tracking_uri(), track=not args.no_track,
                          progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          only=args.only.split(",") if args.only else None, seeds=seeds,
                          system_metrics_s=args.system_metrics, log_model=args.log_model,
                          **({"tracking_timeout": args.tracking_timeout} if args.tracking_timeout is not None else {}))
    failed = [r for r in runs if r.get("status") == "FAILED"]
    several = len(seeds) > 1
    print(f"{cfg.name} (seed{'s' if several else ''} {','.join(map(str, seeds))}, "
          f"{len(runs)} run{'s' if len(runs) > 1 else ''})")
    print(results_table(runs, show_seed=several))
    rows = None
    if several:
        from cl.runner.invocation import comparison_entry
        from evaluation import compare

        rows = compare.comparison([comparison_entry(r) for r in runs if r.get("status") == "FINISHED"])
        print(f"\nmean ± std over seeds {','.join(map(str, seeds))}:")
        print(compare.text_table(rows))
    tracked = [f"{r['name']}{'-seed' + str(r['seed']) if several else ''}={r['mlflow_run_id']}"
               for r in runs if r["mlflow_run_id"]]
    if tracked:
        print(f"MLflow runs: {', '.join(tracked)}")
        if runs[0].get("mlflow_parent_run_id"):
            print(f"MLflow parent run: {runs[0]['mlflow_parent_run_id']}")
    if args.json:
        wall = time.perf_counter() - start
        if len(runs) == 1:
            out = {**runs[0], "experiment": cfg.name}
        else:
            out = {"experiment": cfg.name, "runs": runs, "wall_time_s": wall}
            out.update({"seeds": seeds} if several else {"seed": seeds[0]})
            if rows is not None:
                from evaluation import compare

                out["comparison"] = compare.table_columns(rows)
        from cl.runner.invocation import json_safe

        print(json.dumps(json_safe(out), allow_nan=False))
    for run in failed:
        print(f"cl: error: run {run['name']} failed: {run['error']}", file=sys.stderr)
    return 1 if failed else 0


def _pretrain(args) -> int:
    from cl.runner.pretrain import load_pretrain, pretrain
    from cl.tracking.store import default_tracking_uri

    cfg, source = load_pretrain(args.file, args.overrides)
    out = pretrain(cfg, source, tracking_uri=args.tracking_uri or default_tracking_uri(), track=not args.no_track,
                   overwrite=args.overwrite, progress=False if args.no_progress else None)
    print(f"{cfg.name}: {cfg.model.name} on {cfg.dataset.name} classes {out['classes']}: held-out accuracy "
          f"{out['test_accuracy']:.4f} on {out['test_samples']} test samples after {len(out['epochs'])} epochs "
          f"({out['train_time_s']:.0f} s training)")
    print(f"weights: {out['output']}")
    if out["mlflow_run_id"]:
        print(f"MLflow run: {out['mlflow_run_id']} (the weights are its artifact model/{Path(out['output']).name})")
    if args.json:
        from cl.runner.invocation import json_safe

        print(json.dumps(json_safe(out), allow_nan=False))
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text}: expected whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return seeds


def entry() -> None:
    """The `cl` command (and `python -m cl`): `main`, then the process's end made cheap. The
    interpreter's last collections walk every object PyTorch's import made (0.8 s after
    torch._dynamo on 2 cores, longer than a short run trains); frozen out of the collector
    they are skipped. Exit handlers and finalizers still run; the memory goes with the process."""
    import gc

    code = main()
    gc.freeze()
    raise SystemExit(code)


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a terminated run ends as an interrupted one: KILLED in MLflow, checkpoint kept


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run" and not args.no_track:
        # Before torch is imported: the child that delivers to MLflow imports it and opens the
        # store meanwhile, on the other core (`cl.tracking.delivery`).
        from cl.tracking import delivery

        try:
            delivery.prestart(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
                              args.tracking_timeout)
        except ValueError as err:  # CL_TRACKING_DELIVERY set to nonsense
            print(f"cl: error: {err}", file=sys.stderr)
            return 2
    if args.command != "run" or threading.current_thread() is not threading.main_thread():
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    from cl.training.checkpoint import CheckpointError
    from cl.config.schema import ConfigError
    from cl.config.registry import UnknownComponentError
    from cl.tracking.store import TrackingError
    from streams.sources import DatasetNotFoundError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "describe":
            return _describe(args)
        if args.command == "schedules":
            return _schedules(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "ui":
            return _ui(args)
        if args.command == "sync":
            return _sync(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "streams":
            return _streams()
        return _list(args.command, args.name)
    except (ConfigError, DatasetNotFoundError, CheckpointError, TrackingError, UnknownComponentError,
            ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"cl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cl: interrupted; results logged so far are kept in MLflow", file=sys.stderr)
        return 130
