"""Scoring a model on every task's test set: every evaluator's per-sample values, summed per
task on the device and read back once per pass. On several processes each scores its share
of the batches and the sums are added over the processes."""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import torch

from cl.config.schema import TrainingConfig
from cl.training.record import RunRecord
from evaluation.evaluators import Evaluator
from strategies.base import Strategy
from strategies.context import Context, eval_mode
from streams.experience import Stream, TensorData


def place_data(data, device: torch.device, on_device: bool | str = "auto"):
    """`data` where the training step reads it (`training.data_on_device`): moved whole to an
    accelerator, once, where `on_device` is true, or "auto" and it fits (a quarter of a CUDA
    device's free memory), so that batches are gathered there; otherwise, for a GPU, in
    pinned host memory, copied batch by batch without blocking the host. On the CPU, as it is."""
    if device.type == "cpu":
        return data
    # Data read lazily is never whole on the device; `auto` asks a CUDA device what is free
    # (another accelerator has no such query, and keeps it on the host).
    if isinstance(data, TensorData) and (on_device is True or on_device == "auto" and _fits(data, device)):
        return data.to(device)
    return data.pinned() if device.type == "cuda" else data


def _fits(data: TensorData, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.numel() * v.element_size() for v in (data.x, data.y, data.t)) < free // 4


class TaskEvaluation:
    """Every evaluator's score on each task's test set, through the strategies that own
    evaluation: `eval_model` (the model to score, e.g. slow weights) and `predict` (class
    scores that are not the model's head, e.g. nearest-mean). Writes the run's matrices
    (`untrained`, `row`) and curve (`periodic`) and emits each to the sinks."""

    def __init__(self, ctx: Context, evaluators: Sequence[Evaluator], settings: TrainingConfig, record: RunRecord,
                 emit: Callable, eval_model_owner: Strategy | None, predict_owner: Strategy | None):
        self.ctx, self.evaluators, self.batch_size = ctx, list(evaluators), settings.eval_batch_size
        self.sampled = [e for e in self.evaluators if e.derived_from is None]  # computed per sample, in one pass
        self.on_device = settings.data_on_device
        self.curve_tasks, self.record, self.emit = settings.curve_tasks, record, emit
        self.eval_model_owner, self.predict_owner = eval_model_owner, predict_owner
        self._subset = None  # the test rows of the tasks a periodic evaluation covers, kept all experience
        self._on_device: tuple[int, TensorData] | None = None

    def evaluate(self, stream: Stream, tasks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """`scores`, its time counted as the run's evaluation time."""
        start = time.perf_counter()
        values = self.scores(stream, tasks)
        self.record.eval_time_s += time.perf_counter() - start
        return values

    def untrained(self, stream: Stream) -> None:
        values = self.evaluate(stream)
        for key, row in values.items():
            self.record.matrices[key][0] = row
        self.emit({f"{key}_task{j}": float(v) for key, row in values.items() for j, v in enumerate(row)}, 0)

    def row(self, stream: Stream, k: int, experience_index: int, weights: dict | None = None) -> None:
        if weights is not None:  # evaluate the weights a strategy gave, then go back to the run's
            model = self.ctx.model
            live = copy.deepcopy(model.state_dict())
            model.load_state_dict(weights)
            try:
                values = self.evaluate(stream)
            finally:
                model.load_state_dict(live)
        else:
            values = self.evaluate(stream)
        for key, row in values.items():
            self.record.matrices[key][k] = row
        seen = stream.seen_tasks(experience_index)
        metrics = {}
        for key, row in values.items():
            metrics.update({f"{key}_task{j}": float(v) for j, v in enumerate(row)})
            metrics[f"{key}_seen"] = float(row[seen].mean()) if seen else float("nan")
        metrics["train_loss"] = self.record.train_loss[-1]
        for name, history in self.record.loss_terms.items():
            if name != self.record.main_loss:
                metrics[f"train_loss_{name}"] = history[-1]
        metrics["experience_train_time_s"] = self.record.experience_time_s[-1]
        self.emit(metrics, k)

    def periodic(self, stream: Stream, experience_index: int) -> None:
        seen = stream.seen_tasks(experience_index)
        tasks = None
        if self.curve_tasks == "seen_and_next":  # what continual evaluation needs, and no more
            upcoming = stream.seen_tasks(min(experience_index + 1, len(stream) - 1))
            tasks = sorted(set(seen) | set(upcoming))
        values = self.evaluate(stream, tasks)
        point = {"iteration": self.record.iteration, "experience": experience_index}
        metrics = {}
        for key, row in values.items():
            point[key] = row.tolist()
            point[f"{key}_seen"] = float(row[seen].mean()) if seen else float("nan")
            metrics.update({f"curve_{key}_task{j}": float(v) for j, v in enumerate(row)})
            metrics[f"curve_{key}_seen"] = point[f"{key}_seen"]
        self.record.curve.append(point)
        self.emit(metrics, self.record.iteration, kind="curve")

    @torch.no_grad()
    def scores(self, stream: Stream, tasks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """{evaluator key: score per task}; with `tasks`, only those are evaluated, the others NaN."""
        ctx, train_model = self.ctx, self.ctx.model
        owner = self.eval_model_owner
        model = (owner.eval_model(ctx) if owner is not None else None) or train_model
        ctx.model, ctx.training = model, False
        data, task_ids = self._test_data(stream, tasks)
        try:
            with eval_mode(model):  # then each module back in its own mode: a frozen BatchNorm stays frozen
                totals = self._sums(data, task_ids, stream.n_tasks)
        finally:
            ctx.model, ctx.training = train_model, True
        sizes = np.array([len(d) for d in stream.test_sets], dtype=float)
        if tasks is not None:
            sizes[[j for j in range(stream.n_tasks) if j not in set(tasks)]] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            values = {e.key: totals[i] / sizes for i, e in enumerate(self.sampled)}
        for e in self.evaluators:
            if e.derived_from is not None:
                values[e.key] = e.derive(values[e.derived_from])
        return {e.key: values[e.key] for e in self.evaluators}

    def _sums(self, data, task_ids: torch.Tensor, n_tasks: int) -> np.ndarray:
        """Each evaluator's per-sample values summed per task over `data`, read back once."""
        ctx, predictor, device = self.ctx, self.predict_owner, self.ctx.device
        sums = torch.zeros(len(self.sampled), n_tasks, device=device)
        # On several processes each scores every world-th batch (the k-th starts at k * batch_size).
        for k, (x, y, t) in enumerate(data.batches(self.batch_size, shuffle=False, part=(ctx.rank, ctx.world))):
            offset = (ctx.rank + k * ctx.world) * self.batch_size
            ids = task_ids[offset:offset + len(y)]
            x, y, t = ctx.transform(x.to(device)), y.to(device), t.to(device)
            scores = predictor.predict(ctx, x, t) if predictor is not None else ctx.forward(x, t)
            for i, evaluator in enumerate(self.sampled):
                sums[i].index_add_(0, ids, evaluator.per_sample(scores, y, ids).to(sums.dtype))
        ctx.all_reduce(sums)  # the processes' sums add up to the whole pass's
        return np.array(sums.tolist())  # the one host sync of the pass

    def _test_data(self, stream: Stream, tasks: Sequence[int] | None = None) -> tuple:
        """The concatenated test sets (of `tasks` only, if given) and their task ids, on the
        device when it holds them."""
        device = self.ctx.device
        data, ids = stream.test_all, stream.test_task_ids
        if tasks is not None and len(tasks) < stream.n_tasks:
            key = (id(stream), tuple(tasks))
            if self._subset is None or self._subset[0] != key:  # the same tasks all experience long
                rows = torch.isin(ids, torch.tensor(list(tasks))).nonzero().squeeze(1)
                self._subset = (key, data.subset(rows), ids[rows])
            data, ids = self._subset[1], self._subset[2]
            if device.type != "cpu":
                return data, ids.to(device)
        if device.type == "cpu":
            return data, ids
        if self._on_device is None or self._on_device[0] != id(stream):
            self._on_device = (id(stream), place_data(data, device, self.on_device))
        return self._on_device[1], ids.to(device)
