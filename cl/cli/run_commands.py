"""`cl run FILE` and `cl pretrain FILE`: train, then print the results table, the MLflow
runs it logged to and, with `--json`, one JSON object of the results."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run_command(args, rank_main=None) -> int:
    """`cl run`; with `--devices N` (N > 1, not under torchrun) it starts N processes that each
    call `rank_main` (handed down by `cl.cli.main`, which this module must not import)."""
    from cl.config.files import load_experiment
    from cl.runner import distributed

    start = time.perf_counter()
    cfg = load_experiment(args.file, args.overrides)
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    world = distributed.launched_world()
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices {args.devices}: expected 1 or more processes")
    if world > 1 and args.devices not in (None, world):
        raise ValueError(f"--devices {args.devices} under torchrun, which started {world} processes: leave it out")
    devices = world if world > 1 else (args.devices or 1)
    if devices > 1:
        distributed.check_data_parallel(cfg, args.only.split(",") if args.only else None, devices)
        if world == 1:  # `--devices N` here: torch starts N processes, each runs this command under WORLD_SIZE
            if rank_main is None:
                raise ValueError(f"--devices {devices}: start the processes with the `cl` command or torchrun")
            return distributed.spawn(args, devices, rank_main)
        distributed.setup(args, cfg.device)
        cfg = load_experiment(args.file, args.overrides)  # with this rank's device where setup named one
        try:
            return _run(args, cfg, start)
        finally:
            distributed.teardown()
    return _run(args, cfg, start)


def _run(args, cfg, start: float) -> int:
    from cl.runner.invocation import run_experiment
    from cl.tracking.store import default_tracking_uri
    from evaluation.report import results_table

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
        from evaluation.summaries import comparison_entry
        from evaluation import compare

        rows = compare.comparison([comparison_entry(r) for r in runs if r.get("status") == "FINISHED"])
        print(f"\nmean ± std over seeds {','.join(map(str, seeds))}:")
        print(compare.text_table(rows))
        note = compare.ranking_note(rows, [comparison_entry(r) for r in runs if r.get("status") == "FINISHED"])
        if note:
            print(note)
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
        from cl.tracking.logger import json_safe

        print(json.dumps(json_safe(out), allow_nan=False))
    for run in failed:
        print(f"cl: error: run {run['name']} failed: {run['error']}", file=sys.stderr)
    return 1 if failed else 0


def pretrain_command(args) -> int:
    from cl.runner.pretrain import load_pretrain, pretrain
    from cl.tracking.store import default_tracking_uri

    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir, the folder the pre-training was checkpointed in")
    cfg, source = load_pretrain(args.file, args.overrides)
    out = pretrain(cfg, source, tracking_uri=args.tracking_uri or default_tracking_uri(), track=not args.no_track,
                   overwrite=args.overwrite, progress=False if args.no_progress else None,
                   checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    print(f"{cfg.name}: {cfg.model.name} on {cfg.dataset.name} classes {out['classes']}: held-out accuracy "
          f"{out['test_accuracy']:.4f} on {out['test_samples']} test samples after {len(out['epochs'])} epochs "
          f"({out['train_time_s']:.0f} s training)")
    print(f"weights: {out['output']}")
    if out["mlflow_run_id"]:
        print(f"MLflow run: {out['mlflow_run_id']} (the weights are its artifact model/{Path(out['output']).name})")
    if args.json:
        from cl.tracking.logger import json_safe

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
