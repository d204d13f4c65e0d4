"""Mixed precision and compilation of the training step, as `training.precision` and
`training.compile` ask.

`Precision` is decided once, when the trainer is built: at `32` it hands out
`contextlib.nullcontext` and steps the optimizer as before, so the float32 path
does no work it did not do before. At `bf16-mixed` and `16-mixed` the forward
pass and the loss run under `torch.autocast`; float16 also scales the loss with
`torch.amp.GradScaler`, whose skipped steps (inf or NaN gradients) the trainer
does not count as training steps.

Parameters, gradients and optimizer state stay float32 whatever the precision;
so does what strategies compute outside the autocast region (Fisher, importances,
class statistics, GEM's programme), and what they take from the training step
(stored logits, features) they cast to their state's dtype.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

#: Lightning's names for the precisions, and the dtype autocast runs the forward pass in.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16,
                                                   "16-mixed": torch.float16}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A no-argument factory of the context the forward pass runs in: `nullcontext` at 32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"training.precision: {precision} needs torch.autocast on {device.type}, "
                         f"which this torch does not have; use precision: 32")
    return lambda: torch.autocast(device.type, dtype=dtype)


class Precision:
    """The autocast context of the forward pass and, for float16, the loss scaler.

    `backward(loss)` and `step(optimizer)` replace `loss.backward()` and
    `optimizer.step()`; between them gradients are unscaled (`unscale`), so
    `after_backward` hooks see and change true gradients. `skipped` tells whether the
    last `step` was skipped by the scaler."""

    def __init__(self, precision: str, device: torch.device):
        self.name = precision
        self.autocast = autocast_factory(precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self.skipped = False

    def backward(self, loss: torch.Tensor) -> None:
        self.skipped = False
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step `optimizer`; False when the scaler skipped the step for inf or NaN gradients."""
        if self.scaler is None:
            optimizer.step()
            return True
        # The scaler lowers its scale exactly when it found inf/NaN gradients and skipped
        # the step: comparing the scale is how its public API tells (one host read).
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.skipped = self.scaler.get_scale() < before
        return not self.skipped

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def compile_model(model: torch.nn.Module, setting) -> None:
    """Compile `model` in place (`nn.Module.compile`) with `training.compile`'s options.

    In place, so the module stays the one strategies hold: its `state_dict` has no
    `_orig_mod.` prefix, `forward_features`/`forward_head` and prompt methods are reached
    as before (they run eagerly; only `model(...)` is compiled), and copies of it work."""
    if not setting:
        return
    options = {} if setting is True else setting.options()
    model.compile(**options)


class GraphBreakReport:
    """Reports torch.compile's graph breaks once, as one `cl` warning line. Dynamo counts
    them in `torch._dynamo.utils.counters` as it compiles (reading them costs nothing;
    `explain` would compile the model a second time); the counters are process-wide, so
    the breaks reported are those counted since this run compiled its model."""

    def __init__(self, enabled: bool):
        self.pending = enabled
        self.before = dict(_graph_breaks()) if enabled else {}

    def check(self) -> None:
        """After the first experience, once its training and evaluation have compiled."""
        if not self.pending:
            return
        self.pending = False
        breaks = {r: n - self.before.get(r, 0) for r, n in _graph_breaks().items() if n > self.before.get(r, 0)}
        if breaks:
            reasons = "; ".join(str(reason).splitlines()[0] for reason in list(breaks)[:3])
            log.warning(f"torch.compile broke the model's graph {sum(breaks.values())} time(s), for "
                        f"{len(breaks)} reason(s): {reasons}. Those parts run eagerly; training.compile: "
                        f"{{fullgraph: true}} makes a break an error naming where it is")


def _graph_breaks() -> dict:
    from torch._dynamo.utils import counters

    return counters.get("graph_break", {})
