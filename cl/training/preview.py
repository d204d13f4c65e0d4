"""The learning rate a run will follow, without training it (`cl schedules`).

`LRPreview` is the trainer with every step made a no-op but the LR's: the same
experience loop, scheduler restarts and stepping, LR owner hooks and copies of the
run (an "infinite" schedule's anneals) as `LifelongTrainer.fit`, so the preview
cannot drift from what a run does. Only the LR owner's hooks run, and the
strategies' `training_data` (it decides how many steps an experience takes).
"""
from __future__ import annotations

import warnings

from cl.config.components import build_model_from, build_optimizer, build_stream, build_strategies
from cl.config.registry import plugins_from
from cl.config.schema import ExperimentConfig
from cl.training.seeds import seed_everything
from cl.training.trainer import LifelongTrainer
from streams.experience import Stream, TensorData


class LRPreview(LifelongTrainer):
    """A trainer that records the LR of every parameter group at every iteration instead of
    training. A fresh trainer only: its optimizer's LR is left where the plan ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        owner = [self.lr_owner] if self.lr_owner is not None else []
        self.hooks = {hook: (strategies if hook in ("training_data", "configure_optimizer") else
                             [s for s in strategies if s in owner])
                      for hook, strategies in self.hooks.items()}
        self.curve: list[list] = []  # [iteration, lrs] for every iteration
        self.anneals: list[dict] = []  # {"after_experience", "iteration", "lrs"} for every copy trained

    def plan(self, stream: Stream) -> tuple[list[list], list[dict], list[int]]:
        """[[iteration, lrs], ...], the copies' LRs, and the iteration each experience ends at."""
        with warnings.catch_warnings():  # scheduler steps with no optimizer step: intended here
            warnings.simplefilter("ignore", UserWarning)
            record = self.fit(stream)
        return self.curve, self.anneals, record.experience_ends

    def _batches(self, data: TensorData, skip: int):
        n = -(-len(data) // self.settings.batch_size)
        return (((), (), ()) for _ in range(skip, n))

    def _train_batch(self, x, y, t):
        ctx = self.ctx
        for s in self.hooks["before_iteration"]:
            s.before_iteration(ctx)
        if ctx.anneal_step is None:
            self.curve.append([ctx.iteration, ctx.lrs])
        else:
            if ctx.anneal_step == 0:
                # At the experience's end: where its last iteration left the count.
                self.anneals.append({"after_experience": ctx.experience.index, "iteration": self.record.iteration,
                                     "lrs": []})
            self.anneals[-1]["lrs"].append(ctx.lrs)
        self._step_scheduler("step")
        return {}

    def _train_on_copy(self, steps: int):
        if not steps or self._trained_on is None or not len(self._trained_on):
            return None
        for a in range(steps):  # the copy's LRs; nothing to restore, nothing trained
            self.ctx.anneal_step = a
            self._train_batch((), (), ())
        self.ctx.anneal_step = None
        return None

    def _setup(self, stream: Stream) -> None:
        super()._setup(stream)
        self.tests = _Unscored()

    def _start(self, stream: Stream):
        self._setup(stream)
        return None


class _Unscored:
    """A preview's evaluation: nothing is scored."""

    def untrained(self, stream):
        pass

    def row(self, stream, k, experience_index, weights=None):
        pass

    def periodic(self, stream, experience_index):
        pass


def planned_lrs(cfg: ExperimentConfig, label: str | None = None) -> dict:
    """The LR curve each run of `cfg` (or the run `label`) will follow, without training
    (`LRPreview`): {label: {"curve": [[iteration, lrs]], "anneals": [...], "experience_ends": [...]}}."""
    runs = cfg.run_specs()
    if label is not None:
        if label not in runs:
            raise ValueError(f"no run '{label}' in {cfg.name}; runs: {', '.join(runs)}")
        runs = {label: runs[label]}
    out = {}
    with plugins_from(cfg.source_dir):
        stream = build_stream(cfg)
        for name, specs in runs.items():
            seed_everything(cfg.seed)  # as a run does before it builds its model
            model = build_model_from(cfg, stream)
            optimizer, scheduler = build_optimizer(cfg, model)
            preview = LRPreview(model, optimizer, build_strategies(specs), cfg.training, device="cpu", seed=cfg.seed,
                                scheduler=scheduler)
            curve, anneals, ends = preview.plan(stream)
            out[name] = {"curve": curve, "anneals": anneals, "experience_ends": ends}
    return out
