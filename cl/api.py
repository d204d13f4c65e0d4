"""The lab from Python (notebooks, scripts, sweeps): what `cl run` does, as functions.

    import cl
    runs = cl.run("experiments/quickstart.yaml", overrides=["seed=1"])   # or a dict of the same keys
    runs[0]["acc"], runs[0]["accuracy_matrix"]

To assemble the pieces yourself, build a stream (`streams`), a model (`cl.models`),
strategies (`strategies`) and a `cl.training.trainer.LifelongTrainer`, and call `fit`: see the
README's "Python API" section.
"""
from __future__ import annotations

from pathlib import Path

from cl.config.files import experiment_from_dict, load_experiment
from cl.config.schema import ExperimentConfig


def load(experiment: str | Path | dict | ExperimentConfig, overrides: list[str] | None = None) -> ExperimentConfig:
    """A checked experiment from a YAML file, a dict of its keys, or an `ExperimentConfig`.
    `overrides` are `--set` strings ("seed=1", "training.optimizer.lr=0.1")."""
    if isinstance(experiment, ExperimentConfig):
        if overrides:
            raise ValueError("overrides apply to a file or a dict; change the ExperimentConfig itself instead")
        return experiment
    if isinstance(experiment, dict):
        return experiment_from_dict(experiment, overrides)
    return load_experiment(experiment, overrides)


def run(experiment: str | Path | dict | ExperimentConfig, *, overrides: list[str] | None = None,
        track: bool = False, tracking_uri: str | None = None, progress: bool = False,
        only: list[str] | None = None, checkpoint_dir: str | None = None, resume: bool = False) -> list[dict]:
    """Run an experiment and return one result per run: the fields `cl run --json` prints
    (acc, bwt, fwt, forgetting, accuracy_matrix, matrices, train_loss, train_time_s, ...).
    Unlike the CLI it does not log to MLflow unless `track=True` (then to `tracking_uri`, else
    MLFLOW_TRACKING_URI, else ./mlflow.db). A run stopped by a non-finite loss comes back with
    status "FAILED" and its error."""
    from cl import console
    from cl.runner.invocation import run_experiment
    from cl.tracking.store import default_tracking_uri

    console.install()  # what the run has to say, printed as `cl run` prints it

    cfg = load(experiment, overrides)
    return run_experiment(cfg, tracking_uri=tracking_uri or (default_tracking_uri() if track else None),
                          track=track, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume, only=only)
