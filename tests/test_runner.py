"""The runner and CLI around the trainer: coerced config values, seeds, checkpoints, progress output."""
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from cl.cli.main import main
from cl.config.components import build_stream
from cl.config.errors import ConfigError
from cl.config.files import load_experiment
from conftest import tiny_experiment, trainer_for

SHUFFLED = {"name": "class_incremental", "n_experiences": 5, "shuffle_classes": True}  # the order follows the seed


def experiment(tmp_path, **changes):
    """Split-Digits in a shuffled class order, an MLP of 32, batches of 32; then `changes`."""
    return tiny_experiment(tmp_path, **{"name": "runner-test", "scenario": SHUFFLED, "hidden": (32,),
                                        "batch_size": 32, **changes})


def run_json(capsys, *args) -> dict:
    assert main(["run", *args, "--json", "--no-track", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_coerced_values_reach_the_constructors(tmp_path, capsys):
    """YAML 1.1 reads `1e-3` as a string; validation turns it into the float Adam needs."""
    path = experiment(tmp_path, optimizer={"name": "adam", "lr": "1e-3"})  # written unquoted: lr: 1e-3
    cfg = load_experiment(path)
    assert cfg.training.optimizer.args["lr"] == "1e-3"  # as YAML gave it
    result = run_json(capsys, str(path))
    assert len(result["accuracy_matrix"]) == 6


def test_stream_seed_is_apart_from_the_run_seed(tmp_path):
    path = experiment(tmp_path)
    orders = {seed: build_stream(load_experiment(path, [f"seed={seed}"])).class_order for seed in (0, 1)}
    assert orders[0] != orders[1]  # by default the stream follows the run seed
    pinned = {seed: build_stream(load_experiment(path, [f"seed={seed}", "stream.seed=0"])).class_order
              for seed in (0, 1, 2)}
    assert pinned[0] == pinned[1] == pinned[2] == orders[0]


def test_callable_arguments_come_from_module_paths(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent("""
        import torch

        def make(data_dir, n=20):
            x = torch.randint(0, 255, (n, 1, 4, 4), dtype=torch.uint8)
            y = torch.arange(n) % 2
            train = torch.utils.data.TensorDataset(x, y)
            return train, train
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    def from_factory(factory):
        return experiment(tmp_path, dataset={"name": "torch_dataset", "factory": factory, "kwargs": {"n": 30}},
                          scenario={**SHUFFLED, "n_experiences": 2})

    stream = build_stream(load_experiment(from_factory("my_data:make")))
    assert sum(e.n_train for e in stream) == 30
    with pytest.raises(ConfigError, match=r"stream.dataset.factory: .*has no attribute 'nope'"):
        load_experiment(from_factory("my_data:nope"))
    with pytest.raises(ConfigError, match="stream.dataset.factory: expected a 'package.module:function' path"):
        load_experiment(from_factory("make"))


def test_periodic_evaluation_with_progress_output(tmp_path, capsys):
    path = experiment(tmp_path, eval_every=10)
    assert main(["run", str(path), "--no-track", "--json"]) == 0
    out = capsys.readouterr()
    assert "experience 1: acc_seen=" in out.err and "experience 5:" in out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert 0 < result["anytime_acc"] < 1


def test_resume_with_a_changed_configuration_is_refused(tmp_path, capsys):
    path = experiment(tmp_path)
    ckpt = tmp_path / "ckpt"
    run_json(capsys, str(path), "--checkpoint-dir", str(ckpt))
    code = main(["run", str(path), "--no-track", "--no-progress", "--checkpoint-dir", str(ckpt), "--resume",
                 "--set", "training.optimizer.lr=0.5", "--set", "training.epochs=2"])
    err = capsys.readouterr().err
    assert code == 2 and "different configuration" in err
    assert "training.epochs: 1 -> 2" in err and "training.optimizer.lr: 0.05 -> 0.5" in err
    # The same configuration resumes (here: from the end, so it just reports the results).
    again = run_json(capsys, str(path), "--checkpoint-dir", str(ckpt), "--resume")
    assert len(again["accuracy_matrix"]) == 6


def test_state_that_cannot_be_loaded_back_is_refused_when_saved(tmp_path, capsys, monkeypatch):
    (tmp_path / "numpy_state.py").write_text(textwrap.dedent("""
        import numpy as np
        from strategies import Strategy

        class Counts(Strategy):
            '''Keeps its counts in a numpy array, which weights_only loading refuses.'''
            def after_experience(self, *args):  # the data comes last in every version of the hook
                self.counts = np.bincount(args[-1].y.numpy(), minlength=10)
            def state_dict(self):
                return {**super().state_dict(), "counts": self.counts}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "numpy_state", raising=False)
    path = experiment(tmp_path, strategies=["numpy_state:Counts"])
    code = main(["run", str(path), "--no-track", "--no-progress", "--checkpoint-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2
    assert "strategy 0 (Counts) state['counts'] is a numpy.ndarray" in err and "weights_only" in err


def test_multihead_on_a_timm_backbone(tmp_path, capsys):
    """One features helper serves timm and lab models: a timm backbone gets one head per task."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x_train=rng.integers(0, 255, (40, 3, 16, 16), dtype=np.uint8),
             y_train=np.arange(40) % 4, x_test=rng.integers(0, 255, (20, 3, 16, 16), dtype=np.uint8),
             y_test=np.arange(20) % 4)
    path = experiment(tmp_path, model={"name": "test_resnet", "multihead": True},
                      scenario={"name": "class_incremental", "n_experiences": 2, "task_labels": True},
                      dataset={"name": "numpy", "path": str(tmp_path / "tiny.npz")})
    result = run_json(capsys, str(path))
    assert np.isfinite(result["task_aware_matrix"]).all()


def test_lazy_path_leaves_the_global_rng_alone():
    """Evaluating through a DataLoader must not draw from the global RNG (it would shift dropout)."""
    from cl.models import MLP
    from strategies import Naive
    from streams import class_incremental, digits
    from streams.experience import Dataset
    from streams.lazy import LazyData

    d = digits()
    lazy = Dataset("lazy-digits", *(LazyData(torch.utils.data.TensorDataset(s.x, s.y), s.y, num_workers=0)
                                     for s in (d.train, d.test)), d.transform)
    stream = class_incremental(lazy, n_experiences=5)
    model = MLP(stream.input_shape, stream.n_classes, hidden=(16,))
    trainer = trainer_for(stream, [Naive()], batch_size=32, model=model, lr=0.1, momentum=0)
    trainer.fit(stream, stop_after=1)
    before = torch.get_rng_state()
    trainer.evaluate(stream)
    list(stream[0].train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(before, torch.get_rng_state())



def test_transfer_metrics_follow_the_setting(tmp_path, capsys):
    """An online stream (one row per task) gets BWT, FWT and forgetting where FWT means something
    (task labels given); a blurry one no FWT; class-incremental without task labels no FWT."""
    path = experiment(tmp_path)
    result = run_json(capsys, str(path), "--set", "stream.online.experience_size=100",
                      "--set", "stream.scenario.task_labels=true")
    assert None not in (result["bwt"], result["fwt"], result["forgetting"])
    result = run_json(capsys, str(path), "--set", "stream.online.experience_size=100")
    assert result["fwt"] is None and None not in (result["bwt"], result["forgetting"])
    result = run_json(capsys, str(path), "--set", "stream.blurry=0.2", "--set", "stream.scenario.task_labels=true")
    assert result["fwt"] is None and result["bwt"] is not None and result["forgetting"] is not None


def test_train_loss_is_the_main_term_alone(tmp_path, capsys, monkeypatch):
    (tmp_path / "constant_term.py").write_text(textwrap.dedent('''
        import torch
        from strategies import Strategy

        class ConstantTerm(Strategy):
            """Adds a constant 100 to the training loss."""
            def extra_loss(self, *args):  # the same in every version of the hook
                return torch.tensor(100.0)  # one unnamed term: logged under the class name
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "constant_term", raising=False)
    path = experiment(tmp_path, strategies=["constant_term:ConstantTerm"])
    result = run_json(capsys, str(path))
    assert max(result["train_loss"]) < 5  # cross-entropy, without the regulariser mixed in
    assert result["loss_terms"]["constantterm"] == [100.0] * 5


def test_only_runs_the_named_runs_of_a_comparison_file(tmp_path, capsys):
    path = experiment(tmp_path, strategies=None,
                      runs={"naive": ["naive"], "joint": ["joint"], "replay": [{"name": "replay", "memory_size": 50}]})
    result = run_json(capsys, str(path), "--only", "replay,naive")
    assert [r["name"] for r in result["runs"]] == ["replay", "naive"]
    assert main(["run", str(path), "--no-track", "--only", "ewc"]) == 2
    assert "--only ewc: no such run in runner-test; runs: naive, joint, replay" in capsys.readouterr().err


def test_checkpoint_every_without_a_checkpoint_dir_just_trains(tmp_path, capsys):
    path = experiment(tmp_path, checkpoint_every=5)
    assert main(["run", str(path), "--json", "--no-track", "--no-progress"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy_matrix"]) == 6
