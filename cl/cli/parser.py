"""The `cl` command's arguments: one small function per command, in the order `cl --help`
lists them."""
from __future__ import annotations

import argparse

from cl.cli.tokenize_command import add_tokenize_parser

DEBUG_HELP = "show the traceback of an error, not just its message"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cl", description="Continual-learning lab: run experiments, track them in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    takes_debug = [_add_run(sub), _add_pretrain(sub)]
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    _add_catalogue(sub)
    takes_debug += [_add_describe(sub), _add_schedules(sub), _add_compare(sub), _add_ui(sub), _add_sweep(sub),
                    _add_sync(sub), add_tokenize_parser(sub)]
    for command in takes_debug:  # `cl run FILE --debug` as well as `cl --debug run FILE`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return p


def _tracking_uri_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")


def _overrides_option(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _add_run(sub) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="validate and run an experiment file")
    run.add_argument("file", help="experiment YAML file")
    _overrides_option(run, "override a key, e.g. --set seed=1 --set training.optimizer.lr=0.1 (repeatable)")
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
    run.add_argument("--devices", type=int, default=None, metavar="N",
                     help="data-parallel on N processes of this machine (one per GPU, else CPU processes "
                          "sharing the cores): the same run as on one, each process training on its share "
                          "of every batch; under torchrun, its processes (naive and replay so far)")
    return run


def _add_pretrain(sub) -> argparse.ArgumentParser:
    pre = sub.add_parser("pretrain", help="train a backbone supervised on a dataset (or some of its classes) and "
                                          "save its weights for experiments (model.weights)")
    pre.add_argument("file", help="pre-training YAML file")
    _overrides_option(pre, "override a key, e.g. --set training.epochs=2 --set output=/tmp/w.safetensors")
    pre.add_argument("--json", action="store_true", help="end standard output with one JSON object of the results")
    _tracking_uri_option(pre)
    pre.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    pre.add_argument("--no-progress", action="store_true", help="no line per epoch")
    pre.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    pre.add_argument("--checkpoint-dir", default=None, help="save the pre-training's state here when it ends "
                                                            "and every training.checkpoint_every iterations")
    pre.add_argument("--resume", action="store_true", help="continue the pre-training from its checkpoint in "
                                                           "--checkpoint-dir")
    return pre


def _add_catalogue(sub) -> None:
    for name in ("strategies", "models", "datasets", "scenarios"):
        listing = sub.add_parser(name, help=f"list the registered {name}, or show one in full")
        listing.add_argument("name", nargs="?", help="show this one: its description, paper and arguments")
    sub.add_parser("streams", help="list the registered scenarios and stream options, one line each")


def _add_describe(sub) -> argparse.ArgumentParser:
    describe = sub.add_parser("describe", help="print the stream an experiment file builds, without training")
    describe.add_argument("file", help="experiment YAML file")
    _overrides_option(describe)
    describe.add_argument("--json", action="store_true", help="print the description as JSON")
    return describe


def _add_schedules(sub) -> argparse.ArgumentParser:
    schedules = sub.add_parser("schedules", help="print (and plot) the LR curve an experiment file's runs will "
                                                 "follow over the whole stream, without training")
    schedules.add_argument("file", help="experiment YAML file")
    _overrides_option(schedules)
    schedules.add_argument("--only", default=None, metavar="LABEL", help="only this run of the file")
    schedules.add_argument("--plot", default=None, metavar="PNG", help="also draw the curves into this image")
    schedules.add_argument("--points", type=int, default=12, help="iterations printed per experience (default 12)")
    schedules.add_argument("--json", action="store_true", help="print every iteration's LRs as JSON")
    return schedules


def _add_compare(sub) -> argparse.ArgumentParser:
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
    return compare


def _add_ui(sub) -> argparse.ArgumentParser:
    ui = sub.add_parser("ui", help="serve the MLflow UI on the lab's store and print each experiment's link")
    _tracking_uri_option(ui)
    ui.add_argument("--port", type=int, default=5000, metavar="PORT",
                    help="the port the UI listens on, on 127.0.0.1; the printed links use it")
    ui.add_argument("--experiment", default=None, help="print only this experiment's link")
    return ui


def _add_sweep(sub) -> argparse.ArgumentParser:
    sweep = sub.add_parser("sweep", help="run the points of a file's sweep: block (grid or random) on Ray Tune, "
                                         "or one after another; choose on a validation split")
    sweep.add_argument("file", help="experiment YAML file with a sweep: block")
    _overrides_option(sweep)
    sweep.add_argument("--workers", type=int, default=2, help="trials at once on Ray (default 2)")
    sweep.add_argument("--no-ray", action="store_true", help="run the points one after another in this process")
    sweep.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1.0)
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0)
    sweep.add_argument("--max-points", type=int, default=1000, metavar="N",
                       help="refuse a sweep of more than N points before any runs (default 1000)")
    _tracking_uri_option(sweep)
    sweep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sweep.add_argument("--json", action="store_true", help="end standard output with one JSON object")
    return sweep


def _add_sync(sub) -> argparse.ArgumentParser:
    sync = sub.add_parser("sync", help="deliver the tracking records that wait in journals to their MLflow stores")
    sync.add_argument("folders", nargs="*", help="journal folders, or folders holding them: checkpoint folders, "
                                                 "./cl-journal (default: CL_JOURNAL_DIR, else ./cl-journal)")
    sync.add_argument("--tracking-uri", default=None, help="deliver to this store (default: MLFLOW_TRACKING_URI, else ./mlflow.db); never to one a journal names")
    return sync
