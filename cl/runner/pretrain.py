"""`cl pretrain FILE`: train a backbone supervised on some classes, save it for later runs.

The continual-learning literature often starts from a backbone pre-trained on part of the
data: the "B-m Inc-n" protocols (Rebuffi et al. 2017; Hou et al. 2019) learn m base classes
first, and nearest-mean classification on a frozen pre-trained extractor (Janson et al.
2022) needs one. A pre-training file names what to train and where to put it:

```yaml
name: pretrain                  # MLflow experiment the run goes to
seed: 0                         # initialisation, data order, augmentation
dataset: {name: cifar10}        # the dataset spec of experiment files (stream.dataset)
classes: [0, 1, 2, 3]           # optional: train on these classes only (default: all)
model: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 6}   # lab or timm name + kwargs
training:
  epochs: 10
  batch_size: 128
  optimizer: {name: adamw, lr: 0.001, weight_decay: 0.05}
  scheduler: {name: onecyclelr, max_lr: 0.001, total_steps: steps}   # stepped every iteration
  augment: true                 # random crop (4 px padding) and horizontal flip of training batches
output: cifar10_vit_base4.safetensors   # relative: under CL_WEIGHTS_DIR (~/.cache/cl-lab/weights)
```

The model's head has one output per trained class, in the order of `classes` (output i is
class `classes[i]`): a head over classes never trained would be noise, and whoever loads the
weights replaces the head anyway (`cl.models.load_backbone_weights`). Accuracy is measured
on the held-out test data of the same classes. The weights are saved as safetensors (no
pickle: anyone's file is safe to load) with metadata: the architecture and its arguments,
the dataset, the classes, epochs, seed, held-out accuracy, lab version and commit, and the
MLflow run. That run (params, per-epoch loss and accuracies, the final accuracy) holds the
same file as an artifact under `model/`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl.config.arguments import coerce_arguments
from cl.config.errors import ConfigError, format_validation_error
from cl.config.files import apply_overrides, read_yaml_mapping
from cl.config.params import flatten
from cl.config.schema import ComponentSpec

WEIGHTS_FORMAT = "cl-lab-pretrained/1"


class PretrainTraining(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: ComponentSpec = ComponentSpec(name="sgd", lr=0.01, momentum=0.9)
    scheduler: ComponentSpec | None = Field(None, description="any torch.optim.lr_scheduler class, stepped every "
                                            "iteration; an argument given as 'steps' gets the run's iterations")
    augment: bool = Field(False, description="random crop (4 px zero padding) and horizontal flip of training "
                                             "batches, on top of the dataset's own transform")


class PretrainConfig(BaseModel):
    """A pre-training file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("pretrain", description="MLflow experiment name")
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    threads: int | None = Field(None, ge=1)
    progress: bool = True
    dataset: ComponentSpec
    classes: list[int] | None = Field(None, min_length=2, description="train on these classes only; the head's "
                                                                      "output i is classes[i]")
    model: ComponentSpec
    training: PretrainTraining
    output: str = Field(description="the .safetensors file to write; relative: under CL_WEIGHTS_DIR")

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"expected distinct class labels >= 0, got {v}")
        return v

    @field_validator("output")
    @classmethod
    def _safetensors(cls, v):
        if not v.endswith(".safetensors"):
            raise ValueError(f"expected a file name ending in .safetensors, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str):
        if v != "auto" and v.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError("expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
        return v


def load_pretrain(path: str | Path, overrides: list[str] | None = None) -> tuple[PretrainConfig, str]:
    """The checked pre-training file and its name for messages. Unknown keys, wrong types and
    components that do not exist or take other arguments are ConfigErrors naming the key."""
    from cl.config.registry import DATASETS, MODELS, ForbiddenComponentError, UnknownComponentError, optimizer_class, \
        scheduler_class

    source = str(path)
    raw = read_yaml_mapping(path, "pre-training")
    raw = apply_overrides(raw, overrides or [], source)
    try:
        cfg = PretrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source).replace("invalid experiment", "invalid pre-training "
                                                                                              "file")) from None
    try:
        make = DATASETS.get(cfg.dataset.name)
    except (UnknownComponentError, ForbiddenComponentError) as err:
        raise ConfigError(f"{source}: dataset.name: {err}") from None
    coerce_arguments(make, cfg.dataset.args, "dataset", source, {"data_dir"})
    if cfg.model.name in MODELS or ":" in cfg.model.name:
        from cl.config.arguments import MODEL_INJECTED

        try:
            cls = MODELS.get(cfg.model.name)
        except (UnknownComponentError, ForbiddenComponentError) as err:
            raise ConfigError(f"{source}: model.name: {err}") from None
        coerce_arguments(cls, {k: v for k, v in cfg.model.args.items() if k != "weights"}, "model", source,
                         MODEL_INJECTED)
    try:
        opt = optimizer_class(cfg.training.optimizer.name)
        sched = None if cfg.training.scheduler is None else scheduler_class(cfg.training.scheduler.name)
    except LookupError as err:
        raise ConfigError(f"{source}: training: {err}") from None
    coerce_arguments(opt, cfg.training.optimizer.args, "training.optimizer", source, {"params"})
    if sched is not None:
        args = {k: 1 if v == "steps" else v for k, v in cfg.training.scheduler.args.items()}
        coerce_arguments(sched, args, "training.scheduler", source, {"optimizer"})
    return cfg, source


def output_path(cfg: PretrainConfig, source: str, overwrite: bool = False) -> Path:
    """Where the weights go (a relative `output` under `cl.models.weights_root()`), checked
    writable before anything trains."""
    from cl.models import weights_root

    path = Path(cfg.output).expanduser()
    if not path.is_absolute():
        path = weights_root() / path
    if path.exists() and not overwrite:
        raise ConfigError(f"{source}: output: {path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise ConfigError(f"{source}: output: {path} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{source}: output: cannot write {path}: {type(err).__name__}: {err}") from None
    return path


def _subset(data, classes: list[int]):
    """The rows of `classes`, labels renumbered to their position in `classes`."""
    import torch

    from streams.experience import TensorData

    wanted = torch.tensor(classes)
    rows = torch.isin(data.y, wanted).nonzero().squeeze(1)
    lookup = torch.full((int(max(data.y.max().item(), max(classes))) + 1,), -1, dtype=torch.long)
    lookup[wanted] = torch.arange(len(classes))
    return TensorData(data.x[rows], lookup[data.y[rows]])


class _Tracker:
    """The pre-training's MLflow run, written directly with `MlflowClient` (the run is short
    and its records few). A store that fails mid-run costs a warning, never the weights."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, params: dict, tags: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from cl.tracking.store import TrackingError, artifacts_beside, check_store_location, quiet_mlflow, \
            sqlite_store_lock

        check_store_location(uri)
        quiet_mlflow()
        try:
            self.client = MlflowClient(uri)
            with sqlite_store_lock(uri):
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    experiment, artifact_location=artifacts_beside(uri, experiment))
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for k in range(0, len(items), 100):  # MLflow's limit per call
                self.client.log_batch(self.run_id, params=items[k:k + 100])
        except Exception as err:
            raise TrackingError(f"MLflow store {uri or '(default)'} could not be opened: "
                                f"{type(err).__name__}: {err}") from err
        self.failed = False

    def _try(self, what, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.failed = True
            print(f"cl: warning: MLflow store failed ({what}: {type(err).__name__}: {err}); the pre-training goes "
                  f"on without it, its weights are saved all the same", file=sys.stderr)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._try("metrics", self.client.log_batch, self.run_id,
                  metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self._try("artifact", self.client.log_artifact, self.run_id, str(path), folder)

    def text(self, text: str, name: str) -> None:
        self._try("artifact", self.client.log_text, self.run_id, text, name)

    def end(self, status: str) -> None:
        self._try("end", self.client.set_terminated, self.run_id, status)


def pretrain(cfg: PretrainConfig, source: str = "<pretrain>", *, tracking_uri: str | None = None,
             track: bool = True, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Run a pre-training file: train, measure held-out accuracy, save the weights (and log
    the MLflow run). Returns {"output", "test_accuracy", "test_samples", "train_samples",
    "classes", "epochs", "train_time_s", "wall_time_s", "mlflow_run_id"}."""
    import torch
    import torch.nn.functional as F

    from cl.config.components import build_dataset
    from cl.config.models import build_model
    from cl.tracking.provenance import source_tags
    from cl.config.registry import optimizer_class, scheduler_class
    from cl.training.devices import usable_cores
    from cl.training.seeds import seed_everything
    from cl.training.devices import resolve_device
    from strategies.context import eval_mode
    from streams.experience import BatchTransform

    wall = time.perf_counter()
    show = cfg.progress if progress is None else progress
    out = output_path(cfg, source, overwrite)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or usable_cores())
    try:
        data = build_dataset(cfg.dataset, cfg.data_dir, source)
        classes = list(cfg.classes) if cfg.classes is not None else list(range(data.n_classes))
        absent = [c for c in classes if c >= data.n_classes]
        if absent:
            raise ConfigError(f"{source}: classes: {absent} not in dataset '{cfg.dataset.name}' "
                              f"(labels 0..{data.n_classes - 1})")
        train, test = _subset(data.train, classes), _subset(data.test, classes)
        if not len(test):
            raise ConfigError(f"{source}: classes: dataset '{cfg.dataset.name}' has no test samples of {classes}")

        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        try:
            model = build_model(cfg.model.name, data.input_shape, len(classes), **cfg.model.args).to(device)
        except TypeError as err:  # a timm model given an argument it does not take
            raise ConfigError(f"{source}: model: {err}") from None
        t = cfg.training
        opt_args = coerce_arguments(optimizer_class(t.optimizer.name), t.optimizer.args, "training.optimizer",
                                    source, {"params"})
        optimizer = optimizer_class(t.optimizer.name)(model.parameters(), **opt_args)
        steps_per_epoch = math.ceil(len(train) / t.batch_size)
        scheduler = None
        if t.scheduler is not None:
            cls = scheduler_class(t.scheduler.name)
            args = {k: steps_per_epoch * t.epochs if v == "steps" else v for k, v in t.scheduler.args.items()}
            scheduler = cls(optimizer, **coerce_arguments(cls, args, "training.scheduler", source, {"optimizer"}))
        transform = data.transform
        if t.augment:
            base = data.transform.describe()
            transform = BatchTransform(base["mean"], base["std"], scale=data.transform.scale, crop_padding=4, flip=True)

        provenance = source_tags(Path(source).resolve() if Path(source).is_file() else None)
        # What a fresh model needs to take these weights; where they started from is said apart.
        architecture = {"name": cfg.model.name, "kwargs": {k: v for k, v in cfg.model.args.items()
                                                           if k not in ("weights", "pretrained")}}
        resolved = cfg.model_dump(mode="json", exclude_none=True)
        tracker = None
        if track:
            tags = {**provenance, "cl.role": "pretrain", "model": cfg.model.name, "dataset": cfg.dataset.name,
                    "classes": json.dumps(classes), "output": str(out)}
            tracker = _Tracker(tracking_uri, cfg.name, f"pretrain-{out.stem}", flatten(resolved), tags)
            tracker.text(yaml.safe_dump(resolved, sort_keys=False), "pretrain.yaml")

        data_rng = torch.Generator().manual_seed(cfg.seed)
        aug_rng = torch.Generator().manual_seed(cfg.seed + 1)

        @torch.no_grad()
        def test_accuracy() -> float:
            correct = 0
            with eval_mode(model):
                for x, y, _ in test.batches(t.eval_batch_size, shuffle=False):
                    correct += (model(transform(x.to(device))).argmax(1) == y.to(device)).sum().item()
            return correct / len(test)

        history, train_s, status = [], 0.0, "FAILED"
        try:
            for epoch in range(t.epochs):
                start = time.perf_counter()
                model.train()
                loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
                for x, y, _ in train.batches(t.batch_size, True, data_rng):
                    x, y = transform(x.to(device), train=True, generator=aug_rng), y.to(device)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    loss_sum += loss.detach() * len(y)
                    correct += (logits.argmax(1) == y).sum()
                train_s += time.perf_counter() - start
                if not torch.isfinite(loss_sum):  # checked once an epoch: a check per step would sync a GPU
                    raise ValueError(f"{source}: non-finite training loss in epoch {epoch + 1}; "
                                             f"the learning rate may be too high")
                point = {"epoch": epoch + 1, "train_loss": loss_sum.item() / len(train),
                         "train_acc": correct.item() / len(train), "test_acc": test_accuracy(),
                         "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - start}
                history.append(point)
                if tracker is not None:
                    tracker.metrics({k: v for k, v in point.items() if k != "epoch"}, epoch + 1)
                if show:
                    print(f"epoch {epoch + 1}/{t.epochs}: loss {point['train_loss']:.4f}, train acc "
                          f"{point['train_acc']:.4f}, test acc {point['test_acc']:.4f} "
                          f"({point['epoch_time_s']:.0f} s)", file=sys.stderr, flush=True)
            accuracy = history[-1]["test_acc"]
            meta = {"format": WEIGHTS_FORMAT, "architecture": json.dumps(architecture, sort_keys=True),
                    "input_shape": json.dumps(list(data.input_shape)),
                    "dataset": json.dumps({"name": cfg.dataset.name, **cfg.dataset.args}, sort_keys=True),
                    "classes": json.dumps(classes), "epochs": str(t.epochs), "seed": str(cfg.seed),
                    "batch_size": str(t.batch_size), "augment": json.dumps(t.augment),
                    "optimizer": json.dumps({"name": t.optimizer.name, **t.optimizer.args}, sort_keys=True),
                    "test_accuracy": repr(accuracy), "test_samples": str(len(test)),
                    "train_samples": str(len(train)), "train_time_s": f"{train_s:.1f}",
                    "lab_version": provenance.get("lab_version", ""),
                    "lab_git_commit": provenance.get("lab_git_commit", ""),
                    "mlflow_run_id": tracker.run_id if tracker is not None else "",
                    "initialised_from": str(cfg.model.args.get("weights") or
                                            ("timm hub" if cfg.model.args.get("pretrained") else "random")),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            save_weights(model, out, meta)
            if tracker is not None:
                tracker.metrics({"test_accuracy": accuracy, "train_time_s": train_s}, t.epochs)
                tracker.artifact(out, "model")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.end(status)
    finally:
        torch.set_num_threads(threads_before)
    return {"output": str(out), "test_accuracy": accuracy, "test_samples": len(test), "train_samples": len(train),
            "classes": classes, "epochs": history, "train_time_s": train_s,
            "wall_time_s": time.perf_counter() - wall, "mlflow_run_id": tracker.run_id if tracker else None}


def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict as a safetensors file with `metadata`, written whole or not at
    all (a temporary file renamed over the target)."""
    from safetensors.torch import save_file

    # Cloned: safetensors refuses tensors that share memory (tied weights); each gets its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a weights file `cl pretrain` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
