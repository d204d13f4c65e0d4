"""`cl sweep FILE`: run the points of a file's `sweep:` block (`cl.runner.sweep`), then print
their table, the chosen point and its results on the test sets."""
from __future__ import annotations

import json


def sweep_command(args) -> int:
    from cl.tracking.logger import json_safe
    from cl.runner.sweep import sweep, sweep_table
    from cl.tracking.store import default_tracking_uri

    out = sweep(args.file, args.overrides, tracking_uri=args.tracking_uri or default_tracking_uri(),
                track=not args.no_track, workers=args.workers, ray=False if args.no_ray else None,
                address=args.address, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                max_points=args.max_points)
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
