"""One run: a resolved configuration and a stream in, a `RunRecord` and its result out.

`prepare_run` builds what the configuration names (model, optimizer, strategies; a frozen
backbone's cached features), `train_run` trains it with the lifelong trainer, and
`run_result` turns the record into the flat result every consumer reads (`--json`,
MLflow, the comparison). Nothing here knows about MLflow: the sinks it is given do.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cl.config.components import build_model_from, build_optimizer, build_strategies
from cl.config.identity import config_hash
from cl.config.schema import ComponentSpec, ExperimentConfig
from cl.training.checkpoint import check_same_config, load_checkpoint
from cl.training.cost import StepCost, counting_flops, run_cost, start_peak_memory
from cl.training.devices import resolve_device
from cl.training.feature_cache import FeatureCache, bypass_reason, cache_root, wants_frozen_features
from cl.training.record import RunRecord
from cl.training.seeds import seed_everything
from cl.training.trainer import LifelongTrainer
from evaluation import continual
from evaluation.summaries import continual_curves, summarise
from streams.experience import Stream

log = logging.getLogger(__name__)


def run_config(cfg: ExperimentConfig, specs: list[ComponentSpec]) -> dict:
    """The resolved configuration of one run: the file's settings with this run's strategies."""
    resolved = cfg.model_dump(mode="json", exclude_none=True)
    out = {k: v for k, v in resolved.items() if k not in ("runs", "strategies", "sweep")}
    out["strategies"] = [s.model_dump(mode="json") for s in specs]
    return out


@dataclass
class PreparedRun:
    """What one run trains: the model (`fit_model`, the head alone where cached features stand
    in for a frozen backbone), its optimizer and scheduler, the strategies, and the stream it
    fits (`fit_stream`, features or data); `cached` says what the feature cache did, `cost`
    what the run cost once trained (`cl.training.cost`)."""

    model: torch.nn.Module
    fit_model: torch.nn.Module
    fit_stream: Stream
    optimizer: torch.optim.Optimizer
    scheduler: object
    strategies: list
    device: torch.device
    cached: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


def prepare_run(cfg: ExperimentConfig, stream: Stream, label: str, specs: list[ComponentSpec],
                features: Callable[[], FeatureCache]) -> PreparedRun:
    """Seeded from `cfg.seed`, so a run's draws never depend on the runs before it.
    `features()` gives the invocation's feature cache, made on first use."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model_from(cfg, stream)
    optimizer, scheduler = build_optimizer(cfg, model.to(device))
    strategies = build_strategies(specs)
    run = PreparedRun(model, model, stream, optimizer, scheduler, strategies, device)
    if wants_frozen_features(strategies):
        run.fit_stream, run.fit_model, run.cached = frozen_features(cfg, label, run, features)
    return run


def frozen_features(cfg: ExperimentConfig, label: str, run: PreparedRun, features: Callable[[], FeatureCache]):
    """For a run whose backbone stays frozen: the stream of its pooled features and the model
    on them (`cl.training.feature_cache`), computed once for every run of the invocation and
    kept on disk, with what that cost; or, where features cannot be kept (augmented training
    data), the stream and model as they are. Either way the run says which."""
    reason = bypass_reason(run.strategies, run.fit_stream, run.model)
    if reason is not None:
        log.info(f"{label}: frozen backbone, but no feature cache: {reason}")
        return run.fit_stream, run.model, {"feature_cache": f"bypassed: {reason}"}
    # Settings that hold no weights may still change the features (timm's global_pool).
    architecture = json.dumps({"name": cfg.model.name, **{k: v for k, v in cfg.model.args.items()
                                                          if k not in ("weights", "pretrained")}},
                              sort_keys=True, default=str)
    cache = features()
    featured, head, stats = cache.featurize(run.fit_stream, run.model, run.device, architecture)
    log.info(f"{label}: frozen backbone, trained on cached features ({cache.root or 'memory only'}): "
             f"{stats.rows_computed} rows through the backbone, {stats.rows_from_disk} read from disk, "
             f"{stats.rows_from_memory} from earlier runs, {stats.train_time_s + stats.test_time_s:.1f} s")
    return featured, head, {"feature_cache": "used", "feature_rows_computed": stats.rows_computed,
                            "feature_rows_from_disk": stats.rows_from_disk,
                            "feature_rows_from_memory": stats.rows_from_memory,
                            "feature_train_time_s": stats.train_time_s, "feature_test_time_s": stats.test_time_s}


def new_feature_cache(cfg: ExperimentConfig) -> FeatureCache:
    return FeatureCache(cache_root(), batch_size=cfg.training.eval_batch_size)


def saved_state(checkpoint: Path | None, config: dict) -> dict | None:
    """A checkpoint's state to resume from, refused if it belongs to another configuration."""
    if checkpoint is None or not checkpoint.exists():
        return None
    state, meta = load_checkpoint(checkpoint)
    check_same_config(checkpoint, meta, config)
    return state


def train_run(cfg: ExperimentConfig, run: PreparedRun, config: dict, *, sinks=(), progress: bool = False,
              progress_label: Callable[[], str] = str, checkpoint: Path | None = None, state: dict | None = None,
              checkpointed: Callable[[], None] = lambda: None) -> tuple[RunRecord, float]:
    """Train `run` through its stream with the file's training settings; resume from `state`.
    `checkpointed()` is called as each checkpoint is written (before it counts as written);
    `progress_label()` prefixes each progress bar. Returns the record and when training
    started (Unix time); what the run cost goes into `run.cost`."""
    def checkpoint_meta():
        checkpointed()
        return {"config": config, "config_hash": config_hash(config)}

    trainer = LifelongTrainer(run.fit_model, run.optimizer, run.strategies, cfg.training, device=run.device,
                              seed=cfg.seed, scheduler=run.scheduler, sinks=sinks, progress=progress,
                              progress_label=progress_label,
                              checkpoint_path=str(checkpoint) if checkpoint else None, checkpoint_meta=checkpoint_meta)
    if state is not None:
        trainer.load_state_dict(state)
    # The objects the imports, the data and the model created live as long as the run: freeze
    # them out of the cyclic garbage collector, whose full collections would otherwise walk
    # them again and again during training (tens of milliseconds each).
    gc.freeze()
    start_peak_memory(run.device)
    started = time.time()  # when training starts (benchmarks/startup.py: the process's cost before it)
    steps = StepCost(trainer) if counting_flops() else None  # one step per experience, counted
    try:
        record = trainer.fit(run.fit_stream)
    finally:
        gc.unfreeze()  # what this run made may be collected again once it is over (the next run freezes anew)
        if steps is not None:
            steps.close()
    run.cost = run_cost(trainer, run.fit_stream, run.model, steps)
    return record, started


def run_result(label: str, seed: int, record: RunRecord, stream: Stream, cached: dict | None = None,
               strategies: list | None = None, cost: dict | None = None) -> dict:
    """The flat result of a finished run: its scalar metrics (`evaluation.summaries`; FWT left out
    where one of its `strategies` learned tasks ahead of their turn, as Joint), matrices, loss
    terms, curves and costs (times; with `cost`, `cl.training.cost`'s parameters, FLOPs,
    memory and throughput); a frozen backbone's feature passes count as its training and
    evaluation forward passes."""
    ahead = any(getattr(s, "learned_ahead", False) for s in strategies or ())
    result = {"name": label, "seed": seed, "status": "FINISHED", **summarise(record, stream, ahead),
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
    for strategy in strategies or ():
        reported = strategy.metrics()
        if clash := sorted(set(reported) & set(result)):
            raise ValueError(f"strategy {type(strategy).__name__} reports metrics named like the run's own or another "
                             f"strategy's: {', '.join(clash[:5])}; give them names of its own")
        result.update(reported)
    if stream.is_sequence:  # a language model's throughput: tokens trained on per training second
        result["tokens_trained"] = record.rows_trained * stream.input_shape[0]
        result["tokens_per_s"] = result["tokens_trained"] / max(record.train_time_s, 1e-9)
        # Per domain: the tokens of the batches of its experiences (mixed_replay's new_tokens_task{j}
        # and replayed_tokens_task{j} split them by the domain each row came from).
        ends = [0] + record.experience_rows
        for e, rows in zip(stream.experiences, (b - a for a, b in zip(ends, ends[1:]))):
            j = e.task_index if e.task_index is not None else e.index
            result[f"tokens_trained_task{j}"] = result.get(f"tokens_trained_task{j}", 0) + rows * stream.input_shape[0]
    for key, curve in continual_curves(record, stream).items():
        prefix = "" if key == "acc" else f"{key}_"
        result[f"{prefix}stability_gaps"] = continual.stability_gaps(*curve, higher_is_better=record.higher_is_better[key])
    if record.curve:  # the primary score on the seen tasks over iterations, for the comparison plot
        key = next(iter(record.matrices))
        result["seen_curve"] = [[p["iteration"], p[f"{key}_seen"]] for p in record.curve]
    if cached:
        result["train_time_s"] += cached.get("feature_train_time_s", 0.0)
        result["eval_time_s"] += cached.get("feature_test_time_s", 0.0)
        result.update(cached)
    result.update(cost or {})
    return result
