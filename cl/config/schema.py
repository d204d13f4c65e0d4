"""The keys of an experiment file, as pydantic classes: what each section may hold,
its defaults, and the rules between keys.

Every component (dataset, scenario, model, strategy, optimizer, scheduler) is
written as `{name: ..., <its arguments>}`, or just its name (`ComponentSpec`).
Its arguments are checked against the component's own constructor signature
(`cl.config.arguments`) once the file's keys are valid (`cl.config.files`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


def check_device(v: str) -> str:
    """A device setting as experiment and pre-training files take it."""
    if v != "auto" and v.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError("expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
    return v


class ComponentSpec(BaseModel):
    """`name` picks the component; every other key is an argument to it."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OnlineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experience_size: int = Field(ge=1, description="samples per online experience")


class StreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: ComponentSpec | None = None
    scenario: ComponentSpec = ComponentSpec(name="class_incremental")
    blurry: float = Field(0.0, ge=0.0, lt=1.0, description="share of each experience handed to the next")
    online: OnlineConfig | None = None
    seed: int | None = Field(None, description="seed of the stream (class order, permutations, blur, "
                                               "online cuts); default: the run's seed")
    first_experiences: int | None = Field(None, ge=1, description="keep only the first k experiences "
                                                                  "(tuning without the tasks to come)")
    validation: float | None = Field(None, gt=0.0, lt=1.0, description="hold this share of each experience's "
                                     "training data out and evaluate on it instead of the test sets")
    preprocessing: Literal["dataset", "model", "model_size"] = Field(
        "dataset", description="image size and normalisation: the dataset's own; those of the model's timm "
                               "pretrained config (what a pre-trained backbone was trained on); or the model's "
                               "size with the dataset's normalisation (model_size, as SLCA and PyCIL normalise)")


class CompileConfig(BaseModel):
    """`training.compile` as a mapping: torch.compile's own options."""
    model_config = ConfigDict(extra="forbid")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fullgraph: bool = Field(False, description="a graph break is an error (naming where) instead of eager code")
    dynamic: bool | None = Field(None, description="compile for varying shapes at once (None: after the "
                                                   "first change of shape)")
    backend: str = Field("inductor", description="torch.compile's backend ('aot_eager' checks a model "
                                                 "compiles without generating code)")

    def options(self) -> dict[str, Any]:
        return self.model_dump()


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: ComponentSpec = ComponentSpec(name="sgd", lr=0.01)
    scheduler: ComponentSpec | None = None
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    scheduler_scope: Literal["run", "experience"] = Field(
        "run", description="'experience': the scheduler is rebuilt, from the LR it started with, at every "
                           "experience; an argument given as the string 'steps' gets the number of scheduler "
                           "steps that experience will take")
    eval_every: int | None = Field(None, ge=1, description="also evaluate every N iterations: the curve of "
                                   "continual evaluation (anytime accuracy, min-ACC, WC-ACC, stability gap)")
    curve_tasks: Literal["seen_and_next", "all"] = Field(
        "seen_and_next", description="what the every-N-iterations evaluation covers: the tasks seen so far and "
                                     "the next experience's, or every task")
    checkpoint_every: int | None = Field(None, ge=1, description="with --checkpoint-dir, also checkpoint every "
                                                                  "N iterations inside an experience")
    lr_log_every: int = Field(50, ge=1, description="log the LR of every parameter group every N iterations")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN or infinite training loss: 'stop' fails the run naming the experience and "
                            "iteration; 'skip' drops that step and counts it (skipped_steps)")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="'bf16-mixed' / '16-mixed': the forward pass, the loss and evaluation under "
                          "torch.autocast in bfloat16 / float16 (weights, gradients and strategies' state stay "
                          "float32; float16 scales the loss with a GradScaler, and a step it skips for inf "
                          "gradients counts as skipped, not trained)")
    compile: bool | CompileConfig = Field(
        False, description="compile the model with torch.compile: true, or {mode, fullgraph, dynamic, backend}; "
                           "graph breaks are reported once")
    data_on_device: Literal["auto"] | bool = Field(
        "auto", description="on a GPU, hold the experience's training and test data there, moved once, so "
                            "batches are gathered on the device: 'auto' where they fit (a quarter of its free "
                            "memory), true always, false never; data left on the host (and lazily read data) "
                            "is pinned and copied without blocking")
    sync_batchnorm: bool = Field(
        False, description="on several processes (--devices N, torchrun), BatchNorm normalises with the "
                           "whole batch's statistics, as one process does (torch's SyncBatchNorm on GPUs, an "
                           "all-reduce over gloo on the CPU); without it each process uses its own share's")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_number(cls, v):
        # YAML reads `precision: 32` as a number; Lightning's `16`/`bf16` mean the mixed ones.
        return {32: "32", "32-true": "32", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed"}.get(v, v)

    @model_validator(mode="after")
    def _steps_need_experience_scope(self):
        if self.scheduler is not None and self.scheduler_scope == "run" and "steps" in self.scheduler.args.values():
            raise ValueError("a scheduler argument of 'steps' needs scheduler_scope: experience "
                             "(the run's total steps are not known before it runs)")
        return self


class SweepRange(BaseModel):
    """A continuous range a random search draws from (log-uniformly with `log: true`)."""
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"expected 0 < low < high for a log range, low < high otherwise; got {self.low}, {self.high}")
        return self


class SweepConfig(BaseModel):
    """`cl sweep`: the points to run (a grid, or random draws) and how to choose among them.
    Every trial is scored on a validation split of the training data, never on a test set."""
    model_config = ConfigDict(extra="forbid")
    method: Literal["grid", "random"] = "grid"
    samples: int | None = Field(None, ge=1, description="random search: how many points to draw")
    parameters: dict[str, list[Any] | SweepRange] = Field(description="config key -> values (or a range to draw "
                                                                      "from); 'seed' sweeps seeds")
    validation: float = Field(0.1, gt=0.0, lt=1.0, description="share of each experience's training data the "
                                                               "objective is measured on")
    protocol: Literal["whole_stream", "first_experiences"] = Field(
        "whole_stream", description="tune on the whole stream, or on its first k experiences only (no peeking "
                                    "at the tasks to come), then run the whole stream with the chosen point")
    first_experiences: int | None = Field(None, ge=1, description="k, for protocol: first_experiences")
    objective: str = Field("acc", description="the trial's metric to choose by (mean over seeds)")
    mode: Literal["max", "min"] = "max"
    final_run: bool = Field(True, description="run the chosen point on the whole stream and its test sets")
    seed: int = Field(0, description="random search's draws")

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "grid" and any(isinstance(v, SweepRange) for v in self.parameters.values()):
            raise ValueError("a grid takes lists of values; ranges are for method: random")
        if self.method == "random" and self.samples is None:
            raise ValueError("method: random needs 'samples'")
        if (self.protocol == "first_experiences") != (self.first_experiences is not None):
            raise ValueError("protocol: first_experiences goes with first_experiences: k (and only with it)")
        if any(isinstance(v, list) and not v for v in self.parameters.values()):
            raise ValueError("every swept parameter needs at least one value")
        return self


class ExperimentConfig(BaseModel):
    """A whole experiment file. Either `strategies` (one run) or `runs` (label -> strategies)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="MLflow experiment name")
    seed: int = 0
    seeds: list[int] | None = Field(None, min_length=1, description="run every run of the file once per seed "
                                                                    "(overrides 'seed'); `cl run --seeds 0,1,2`")
    device: str = Field("auto", description="`cpu`, `cuda` (the current GPU), `cuda:N` (GPU number N, from 0), "
                                            "`mps`, or `auto` (CUDA when available, else the CPU)")
    data_dir: str | None = None
    threads: int | None = Field(None, ge=1, description="torch's CPU threads (default: the cores this "
                                                        "process may use, by affinity and cgroup quota)")
    progress: bool = Field(True, description="false: print nothing but the final result")
    stream: StreamConfig
    model: ComponentSpec
    training: TrainingConfig = TrainingConfig()
    strategies: list[ComponentSpec] | None = None
    runs: dict[str, list[ComponentSpec]] | None = None
    sweep: SweepConfig | None = Field(None, description="what `cl sweep` runs; `cl run` ignores it")
    # The experiment file's folder: plugin modules it names are looked up there first.
    _source_dir: Path | None = PrivateAttr(default=None)
    _source_file: Path | None = PrivateAttr(default=None)  # the YAML file, for MLflow's source tags

    @property
    def source_dir(self) -> Path | None:
        return self._source_dir

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    def run_seeds(self) -> list[int]:
        """The seeds every run of the file goes through: `seeds`, else just `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]

    def with_seed(self, seed: int) -> "ExperimentConfig":
        """This experiment at one seed (plugin folder and source file kept)."""
        cfg = self.model_copy(update={"seed": seed, "seeds": None})
        cfg._source_dir, cfg._source_file = self._source_dir, self._source_file
        return cfg

    @field_validator("runs", mode="before")
    @classmethod
    def _single_strategy_runs(cls, v):
        # `runs: {naive: naive}` is a run of one strategy.
        return {k: ss if isinstance(ss, list) else [ss] for k, ss in v.items()} if isinstance(v, dict) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str):
        return check_device(v)

    @model_validator(mode="after")
    def _one_of_strategies_or_runs(self):
        if (self.strategies is None) == (self.runs is None):
            raise ValueError("give exactly one of 'strategies' (one run) or 'runs' (several runs to compare)")
        if self.runs is not None and not self.runs:
            raise ValueError("'runs' is empty")
        return self

    @model_validator(mode="after")
    def _online_is_one_pass(self):
        if self.stream.online is not None and self.training.epochs != 1:
            raise ValueError("an online stream is seen once: training.epochs must be 1")
        return self

    @property
    def stream_seed(self) -> int:
        return self.seed if self.stream.seed is None else self.stream.seed

    def run_specs(self) -> dict[str, list[ComponentSpec]]:
        """Label -> strategies of every run this experiment makes."""
        if self.runs is not None:
            return dict(self.runs)
        return {"+".join(s.name for s in self.strategies) or "naive": list(self.strategies)}
