"""`cl describe FILE` and `cl schedules FILE`: what an experiment file will do (the stream
it builds, the LR curve its runs follow), without training."""
from __future__ import annotations

import json


def describe_command(args) -> int:
    from cl.config.components import build_stream
    from cl.config.files import load_experiment
    from streams.sources import no_downloads

    # Loading checks every component the file names (cl.config.validation, as `cl run` does), so
    # nothing the registry refuses is called; the stream is then built from what is on disk only.
    cfg = load_experiment(args.file, args.overrides)
    with no_downloads("`cl describe` downloads nothing: `cl run` fetches it (needs internet)."):
        stream = build_stream(cfg)
    info = stream.describe()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['name']}: {info['n_experiences']} experiences, {info['n_tasks']} test sets, "
          f"{info['n_classes']} classes, input {tuple(info['input_shape'])}")
    print(f"class order: {_classes(info['class_order']) if len(info['class_order']) > 200 else info['class_order']}")
    prep = info.get("preprocessing") or {}
    if prep.get("mean") is not None:
        print(f"preprocessing: mean {prep['mean']}, std {prep['std']}"
              + (f", resized to {prep['size']}" if prep.get("size") else "")
              + (f", crop padding {prep['crop_padding']}" if prep.get("crop_padding") else "")
              + (", flip" if prep.get("flip") else ""))
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
        print(f"{e['index'] + 1:>5} {e['task_label']:>10} {tasks:>7} {e['n_train']:>8}  {_classes(e['classes'])}")
    print("test sets: " + ", ".join(f"task{t['task']} {_classes(t['classes'])} n={t['n_test']}" for t in info["test_sets"]))
    schedule = {k: v for k, v in info["schedule"].items() if k not in ("focus", "recurrences", "class_names")}
    if schedule:
        print(f"schedule: {json.dumps(schedule)}")
    if "recurrences" in info["schedule"]:
        print(f"recurrences of earlier tasks: {len(info['schedule']['recurrences'])} "
              f"over {len(info['schedule']['focus'])} phases")
    return 0


def _classes(classes: list[int]) -> str:
    """A class list as a person reads it: a vocabulary of 50,000 token ids as its range."""
    if len(classes) <= 24:
        return str(classes)
    if classes == list(range(classes[0], classes[0] + len(classes))):
        return f"{classes[0]}..{classes[-1]} ({len(classes)} classes)"
    return f"[{', '.join(map(str, classes[:8]))}, ...] ({len(classes)} classes)"


def _ranges(values: list[int]) -> str:
    if len(values) <= 12:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:6])) + f", ... ({len(values)} in all) ..., " + ", ".join(map(str, values[-3:]))


def schedules_command(args) -> int:
    from cl.config.files import load_experiment
    from cl.training.preview import planned_lrs

    cfg = load_experiment(args.file, args.overrides)
    plans = planned_lrs(cfg, args.only)
    if args.json:
        print(json.dumps(plans))
        return 0
    for label, plan in plans.items():
        _print_plan(label, plan, args.points)
    if args.plot:
        _plot_lrs(plans, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _print_plan(label: str, plan: dict, points: int) -> None:
    """`points` iterations of each experience, evenly spaced, and the anneals run on copies."""
    curve, ends = plan["curve"], plan["experience_ends"]
    print(f"{label}: {len(curve)} iterations; LR of each parameter group")
    start = 0
    for k, end in enumerate(ends):
        n = end - start
        picks = sorted({start + round(i * (n - 1) / max(points - 1, 1)) for i in range(min(points, n))})
        for i in picks:
            lrs = " ".join(f"{lr:.3e}" for lr in curve[i][1])
            print(f"  experience {k + 1:>3}  iteration {curve[i][0]:>7}  {lrs}")
        for anneal in plan["anneals"]:
            if anneal["after_experience"] == k:
                a = anneal["lrs"]
                print(f"  anneal on a copy after experience {k + 1}: {len(a)} steps, "
                      f"{a[0][0]:.3e} -> {a[-1][0]:.3e} (evaluated; training continues from the constant LR)")
        start = end


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
