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
the dataset, the classes, epochs, seed, held-out accuracy, lab version and commit. Its
MLflow run (the held-out accuracy every epoch, the final one, the training loss; tag
`output` names the file) holds the same file as an artifact under `model/`.

It runs through the lab's own machinery (`pretrain`): the same trainer, journal and MLflow
layout as `cl run`, so a pre-training checkpoints (`--checkpoint-dir`, `training.checkpoint_every`),
survives a kill and resumes (`--resume`) exactly as an experiment does.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cl.config.arguments import coerce_arguments
from cl.config.errors import ConfigError, format_validation_error
from cl.config.files import apply_overrides, read_yaml_mapping
from cl.config.schema import ComponentSpec, check_device

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
    nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN or infinite training loss: 'stop' fails "
                                               "the pre-training, 'skip' drops that step")
    checkpoint_every: int | None = Field(None, ge=1, description="with --checkpoint-dir, also checkpoint every N "
                                                                  "iterations inside an epoch")


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
        return check_device(v)


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


def output_path(cfg: PretrainConfig, source: str, overwrite: bool = False, resumed: bool = False) -> Path:
    """Where the weights go (a relative `output` under `cl.models.weights_root()`), checked
    writable before anything trains. An existing file is replaced with `overwrite`, or when
    `resumed` if `cl pretrain` wrote it (a resumed pre-training may have written it already)."""
    from cl.models import weights_root

    path = Path(cfg.output).expanduser()
    if not path.is_absolute():
        path = weights_root() / path
    if path.exists() and not overwrite and not (resumed and _written_by_pretrain(path)):
        raise ConfigError(f"{source}: output: {path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise ConfigError(f"{source}: output: {path} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")  # a new file
        os.close(fd)
        os.unlink(probe)
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


def pretrain(cfg: PretrainConfig, source: str = "<pretrain>", *, tracking_uri: str | None = None,
             track: bool = True, overwrite: bool = False, progress: bool | None = None,
             checkpoint_dir: str | None = None, resume: bool = False) -> dict:
    """Run a pre-training file: train, measure held-out accuracy, save the weights. It is a
    run of the lab like any other (`cl.runner.invocation`): one experience holding every
    class of `classes`, fine-tuned by the lifelong trainer, evaluated on the held-out data
    every epoch, journaled to MLflow, checkpointed and resumed as `cl run` is. Returns
    {"output", "test_accuracy", "test_samples", "train_samples", "classes", "epochs",
    "train_time_s", "wall_time_s", "mlflow_run_id"}."""
    from cl.config.components import build_dataset
    from cl.runner.invocation import run_experiment

    wall = time.perf_counter()
    # A resumed pre-training may have written its file already (killed while it was delivered).
    out = output_path(cfg, source, overwrite, resume and checkpoint_dir is not None and Path(checkpoint_dir).is_dir())
    data = build_dataset(cfg.dataset, cfg.data_dir, source)
    classes = list(cfg.classes) if cfg.classes is not None else list(range(data.n_classes))
    stream = joint_stream(data, classes, cfg.training.augment, source)
    steps_per_epoch = math.ceil(len(stream.experiences[0].train) / cfg.training.batch_size)
    experiment = experiment_of(cfg, steps_per_epoch, source)
    tags = {"cl.role": "pretrain", "classes": json.dumps(classes), "output": str(out)}
    results = run_experiment(experiment, tracking_uri=tracking_uri, track=track, progress=progress is not False,
                             checkpoint_dir=checkpoint_dir, resume=resume, extra_tags=tags, stream=stream,
                             keep=lambda run, result: _save(run, result, cfg, classes, data, out))
    result = results[0]
    if result["status"] != "FINISHED":
        raise ValueError(f"{source}: {result['error']}")
    test = stream.experiences[0].test
    return {"output": str(out), "test_accuracy": result["acc"], "test_samples": len(test),
            "train_samples": len(stream.experiences[0].train), "classes": classes,
            "epochs": [{"epoch": k + 1, "test_acc": acc} for k, (_, acc) in enumerate(result.get("seen_curve", []))],
            "train_time_s": result["train_time_s"], "wall_time_s": time.perf_counter() - wall,
            "mlflow_run_id": result.get("mlflow_run_id")}


def joint_stream(data, classes: list[int], augment: bool, source: str):
    """One experience of every class in `classes` (labels renumbered to their position), with
    random crops and flips of the training batches if asked."""
    from streams.experience import BatchTransform, Dataset
    from streams.scenarios import class_incremental

    absent = [c for c in classes if c >= data.n_classes]
    if absent:
        raise ConfigError(f"{source}: classes: {absent} not in dataset '{data.name}' (labels 0..{data.n_classes - 1})")
    train, test = _subset(data.train, classes), _subset(data.test, classes)
    if not len(test):
        raise ConfigError(f"{source}: classes: dataset '{data.name}' has no test samples of {classes}")
    transform = data.transform
    if augment:
        base = data.transform.describe()
        transform = BatchTransform(base["mean"], base["std"], scale=data.transform.scale, crop_padding=4, flip=True)
    return class_incremental(Dataset(data.name, train, test, transform), n_experiences=1)


def experiment_of(cfg: PretrainConfig, steps_per_epoch: int, source: str):
    """The pre-training as an experiment file: fine-tuning (`naive`) on the joint stream, the
    scheduler stepped every iteration, the held-out accuracy taken every epoch."""
    from cl.config.files import experiment_from_dict

    t = cfg.training
    training = {"epochs": t.epochs, "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size,
                "optimizer": t.optimizer.model_dump(mode="json"), "scheduler_interval": "step",
                "scheduler_scope": "experience", "eval_every": steps_per_epoch, "curve_tasks": "all",
                "checkpoint_every": t.checkpoint_every, "nonfinite": t.nonfinite}
    if t.scheduler is not None:
        training["scheduler"] = t.scheduler.model_dump(mode="json")
    raw = {"name": cfg.name, "seed": cfg.seed, "device": cfg.device, "data_dir": cfg.data_dir, "threads": cfg.threads,
           "progress": cfg.progress, "stream": {"dataset": cfg.dataset.model_dump(mode="json")},
           "model": cfg.model.model_dump(mode="json"), "training": training, "runs": {"pretrain": ["naive"]}}
    file = Path(source) if Path(source).is_file() else None
    return experiment_from_dict({k: v for k, v in raw.items() if v is not None}, source=source,
                                source_file=file)  # MLflow's source tags name the pre-training file


def _save(run, result: dict, cfg: PretrainConfig, classes: list[int], data, out: Path) -> Path:
    """The trained weights, with what a later run needs to know of them (`read_metadata`)."""
    from cl.tracking.provenance import source_tags

    t, provenance = cfg.training, source_tags(None)
    # What a fresh model needs to take these weights; where they started from is said apart.
    architecture = {"name": cfg.model.name, "kwargs": {k: v for k, v in cfg.model.args.items()
                                                       if k not in ("weights", "pretrained")}}
    meta = {"format": WEIGHTS_FORMAT, "architecture": json.dumps(architecture, sort_keys=True),
            "input_shape": json.dumps(list(data.input_shape)),
            "dataset": json.dumps({"name": cfg.dataset.name, **cfg.dataset.args}, sort_keys=True),
            "classes": json.dumps(classes), "epochs": str(t.epochs), "seed": str(cfg.seed),
            "batch_size": str(t.batch_size), "augment": json.dumps(t.augment),
            "optimizer": json.dumps({"name": t.optimizer.name, **t.optimizer.args}, sort_keys=True),
            "test_accuracy": repr(result["acc"]), "test_samples": str(len(run.fit_stream.experiences[0].test)),
            "train_samples": str(len(run.fit_stream.experiences[0].train)),
            "train_time_s": f"{result['train_time_s']:.1f}",
            "lab_version": provenance.get("lab_version", ""), "lab_git_commit": provenance.get("lab_git_commit", ""),
            "initialised_from": str(cfg.model.args.get("weights") or
                                    ("timm hub" if cfg.model.args.get("pretrained") else "random")),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    save_weights(run.model, out, meta)
    return out


def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict as a safetensors file with `metadata`, written whole or not at
    all (a temporary file renamed over the target)."""
    from safetensors.torch import save_file

    # Cloned: safetensors refuses tensors that share memory (tied weights); each gets its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # a new file, never one there
    os.close(fd)
    tmp = Path(tmp)
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _written_by_pretrain(path: Path) -> bool:
    try:
        return read_metadata(path).get("format") == WEIGHTS_FORMAT
    except Exception:  # not a safetensors file: not ours
        return False


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a weights file `cl pretrain` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
