"""Compiled models (`training.compile`): the same accuracy as eager, checkpoints that load either
way (no `_orig_mod.` keys), strategies that call the model their own way, graph breaks reported once."""
import logging
import shutil

import numpy as np
import pytest
import torch

from cl.config.schema import TrainingConfig
from cl.models import MLP
from cl.training.checkpoint import load_checkpoint
from strategies import STRATEGIES
from test_catalogue import ON_A_VIT, SMALL, vit_trainer_for
from conftest import trainer_for

#: Dynamo's tracing without code generation: checks the plumbing in a fraction of inductor's time.
TRACE_ONLY = {"backend": "eager"}


def der_trainer(stream, path=None, compile=False):
    """DER replays through `ctx.forward` (the model's own call), beside the training batch."""
    return trainer_for(stream, [STRATEGIES["der"](memory_size=50)], seed=1, batch_size=32, checkpoint_path=path,
                       compile=compile)


def fit_keeping_checkpoint(trainer, stream, path, copy_to):
    """Fit two experiences, keep that checkpoint, then go on to the third; the accuracy matrix."""
    trainer.fit(stream, stop_after=2)
    shutil.copy(path, copy_to)
    return trainer.fit(stream, stop_after=3).accuracy_matrix


def resumed_from(checkpoint, stream, compile):
    trainer = der_trainer(stream, compile=compile)
    trainer.load_state_dict(load_checkpoint(checkpoint)[0])
    return trainer.fit(stream, stop_after=3).accuracy_matrix


def test_compiled_and_eager_runs_agree_and_load_each_others_checkpoints(small_stream, tmp_path):
    s, e, c = small_stream, tmp_path / "eager.pt", tmp_path / "compiled.pt"
    eager = fit_keeping_checkpoint(der_trainer(s, str(e)), s, e, tmp_path / "eager2.pt")
    compiled_trainer = der_trainer(s, str(c), compile=True)  # inductor, as `compile: true` asks
    compiled = fit_keeping_checkpoint(compiled_trainer, s, c, tmp_path / "compiled2.pt")
    assert np.abs(compiled - eager)[:4].max() <= 0.005
    state, _ = load_checkpoint(tmp_path / "compiled2.pt")
    assert not [k for k in state["model"] if "_orig_mod" in k]
    for checkpoint, compile in ((tmp_path / "compiled2.pt", False), (tmp_path / "eager2.pt", TRACE_ONLY)):
        assert np.abs(resumed_from(checkpoint, s, compile) - eager)[:4].max() <= 0.005


def test_a_model_compiled_by_the_caller_saves_plain_keys(small_stream):
    torch.manual_seed(0)
    plain = MLP(small_stream.input_shape, small_stream.n_classes, hidden=(64,))
    wrapped = torch.compile(plain, **TRACE_ONLY)  # keys under `_orig_mod.`
    trainer = trainer_for(small_stream, [], model=wrapped)
    trainer.fit(small_stream, stop_after=1)
    state = trainer.state_dict()
    assert set(state["model"]) == set(plain.state_dict())
    trainer._load_state(state)  # and loads back into the wrapper
    MLP(small_stream.input_shape, small_stream.n_classes, hidden=(64,)).load_state_dict(state["model"])


@pytest.mark.parametrize("name", ["nearest_mean", "lwf", "icarl", "l2p"])
def test_strategies_that_call_the_model_their_own_way_run_compiled(name, small_stream):
    """Features through forward_features/forward_head, a deep copy of the compiled model, prompts."""
    build = vit_trainer_for if name in ON_A_VIT else trainer_for

    def run(**kw):
        return build(small_stream, [STRATEGIES[name](**SMALL.get(name, {}))], seed=1, batch_size=64, **kw) \
            .fit(small_stream, stop_after=2).accuracy_matrix

    assert np.abs(run(compile=TRACE_ONLY) - run())[:3].max() <= 0.005


def test_graph_breaks_are_reported_once(small_stream, caplog):
    class Breaking(MLP):
        def forward(self, x):
            h = self.features(x)
            torch._dynamo.graph_break()  # e.g. a print or .item() in a model's forward
            return self.head(h)

    torch.manual_seed(0)
    model = Breaking(small_stream.input_shape, small_stream.n_classes, hidden=(64,))
    with caplog.at_level(logging.WARNING, logger="cl"):
        trainer_for(small_stream, [], model=model, compile=TRACE_ONLY).fit(small_stream, stop_after=3)
    lines = [r.getMessage() for r in caplog.records if "graph" in r.getMessage()]
    assert len(lines) == 1 and "graph_break()" in lines[0]


def test_compile_settings():
    assert TrainingConfig(compile=True).compile is True
    spec = TrainingConfig(compile={"mode": "reduce-overhead", "fullgraph": True}).compile
    assert spec.options()["mode"] == "reduce-overhead" and spec.options()["fullgraph"]
    with pytest.raises(ValueError):
        TrainingConfig(compile={"mode": "fastest"})
