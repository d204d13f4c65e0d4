"""Data parallel beyond the loss (issue 26): what strategies compute from the data (EWC's
Fisher, MAS's importances, class means, memory gradients, masked and distilled terms) is, on 2
gloo processes, what one process computes. Each run is a `cl run` subprocess, as a user
starts it; the checkpoint's strategy states, the final weights and the accuracy matrix of
`--devices 2` are compared with `--devices 1`."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import tiny_experiment
from test_distributed import cl_run


def close(one, two, where: str = "state") -> None:
    """`two` equals `one`: float tensors to 1e-4 of their norm (and 1e-6 absolute: a parameter
    whose gradient is 0 in exact arithmetic, as attention's key bias, moves by rounding alone),
    everything else exactly."""
    if isinstance(one, dict):
        assert one.keys() == two.keys(), where
        for k in one:
            close(one[k], two[k], f"{where}.{k}")
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two)):
            close(a, b, f"{where}[{i}]")
    elif isinstance(one, torch.Tensor):
        assert one.shape == two.shape and one.dtype == two.dtype, where
        if one.is_floating_point():
            gap = torch.linalg.vector_norm((one - two).double())
            assert gap <= 1e-4 * torch.linalg.vector_norm(one.double()) + 1e-6, (where, float(gap))
        else:
            assert torch.equal(one, two), where
    else:
        assert one == two, where


def one_and_two(tmp_path, strategies: list, **config) -> tuple[dict, dict]:
    """The run of `strategies` on 1 and on 2 processes: {devices: (results, checkpoint state)}."""
    file = tiny_experiment(tmp_path, strategies=strategies, **config)
    with ThreadPoolExecutor(2) as pool:  # both at once: mostly start-up, which overlaps
        done = dict(zip((1, 2), pool.map(lambda d: cl_run(file, d, tmp_path / f"ckpt{d}"), (1, 2))))
    results, states = {}, {}
    for devices in (1, 2):
        assert done[devices].returncode == 0, done[devices].stderr
        results[devices] = json.loads(done[devices].stdout.strip().splitlines()[-1])
        saved, = (tmp_path / f"ckpt{devices}").glob("*.pt")  # the run's one checkpoint
        states[devices] = torch.load(saved, weights_only=True)["state"]
    return results, states


def assert_same_run(results: dict, states: dict) -> None:
    close(states[1]["strategies"], states[2]["strategies"], "strategies")
    close(states[1]["model"], states[2]["model"], "model")
    one, two = torch.tensor(results[1]["accuracy_matrix"]), torch.tensor(results[2]["accuracy_matrix"])
    assert torch.allclose(one, two, atol=0.005, equal_nan=True), (one, two)
    assert results[1]["iterations"] == results[2]["iterations"]
    one, two = results[1]["train_loss"], results[2]["train_loss"]  # None where nothing trains (frozen features)
    assert [x is None for x in one] == [x is None for x in two]
    assert [x for x in two if x is not None] == pytest.approx([x for x in one if x is not None], rel=1e-4)


# Batches of 50 rows over 2 experiences: a last batch smaller than the rest (uneven shares),
# and importances taken in groups and batches that do not split evenly either. Penalty
# strengths within SGD's stability limit (see `stability_note`): a diverging run would amplify
# rounding, the one difference an exact split leaves. Strategies that compose share a run.
def test_fisher_importances_and_class_means_are_one_process_s(tmp_path):
    results, states = one_and_two(tmp_path, [
        {"name": "ewc", "strength": 10, "fisher": "sample", "fisher_samples": 75},
        {"name": "mas", "importance_batch_size": 5, "importance_samples": 103},
        {"name": "nearest_mean", "freeze_backbone": False}], n_experiences=2, batch_size=50)
    assert_same_run(results, states)
    ewc, mas, nearest = states[2]["strategies"]
    for penalty in (ewc, mas):  # the importances were computed
        assert all(float(s["a"].abs().sum()) > 0 for s in penalty["sums"].values())
    assert int(nearest["counts"].sum()) == int(states[1]["strategies"][2]["counts"].sum()) > 0


# Every other data-parallel strategy of the catalogue, in groups that compose (a run on 2
# processes costs seconds of start-up, so each group is one run), each small.
@pytest.mark.parametrize("strategies", [
    [{"name": "online_ewc", "strength": 1000, "fisher": "batched", "fisher_batch_size": 7, "fisher_samples": 101},
     "si", "lwf", {"name": "momentum_weights", "tau": 0.9}, {"name": "warmup_decay", "max_lr": 0.05}],
    [{"name": "er_ace", "memory_size": 60, "replay_batch_size": 15}, {"name": "gem", "patterns_per_experience": 21},
     {"name": "l2", "strength": 1}],
    [{"name": "power_law_rehearsal", "budget": 40}, {"name": "gdumb", "memory_size": 120},
     {"name": "mixed_replay", "fraction": 0.2, "memory_size": 60},
     {"name": "agem", "patterns_per_experience": 21, "sample_size": 15}, {"name": "mas", "importance_samples": 101}],
    ["cumulative", {"name": "icarl", "memory_size": 60}],
    [{"name": "slca", "samples_per_class": 16, "align_epochs": 2, "align_batch_size": 20},
     {"name": "infinite_lr", "max_lr": 0.05}],
    ["joint", "nearest_mean"],
], ids=["online_ewc+si+lwf+momentum+warmup", "er_ace+gem+l2", "power_law+gdumb+mixed_replay+agem+mas",
        "cumulative+icarl", "slca+infinite_lr", "joint+frozen_nearest_mean"])
def test_strategy_runs_as_on_one_process(tmp_path, strategies):
    results, states = one_and_two(tmp_path, strategies, n_experiences=2, batch_size=50)
    assert_same_run(results, states)


# The prompt methods train parameters of their own beside a frozen ViT (the data-parallel
# wrapper must average theirs too); APG and OVOR also compute at each experience's end.
def test_prompt_methods_run_as_on_one_process(tmp_path):
    vit = {"name": "vit_tiny_patch16_224", "img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32,
           "depth": 5, "num_heads": 2}
    runs = {"l2p": ["l2p"], "dualprompt": ["dualprompt"], "coda_prompt": [{"name": "coda_prompt", "n_components": 10}],
            "apg": [{"name": "apg", "finetune_samples_per_class": 8, "mlp_dropout": 0.0}], "ovor": [{"name": "ovor", "vor_epochs": 1}]}
    file = tiny_experiment(tmp_path, strategies=None, runs=runs, model=vit, n_experiences=2, batch_size=50,
                           lr=0.05)  # SGD: Adam would scale rounding noise (a key bias, whose gradient is 0) up to its steps
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip((1, 2), pool.map(lambda d: cl_run(file, d, tmp_path / f"ckpt{d}"), (1, 2))))
    for devices in (1, 2):
        assert done[devices].returncode == 0, done[devices].stderr
    for run in runs:
        one, two = (torch.load(tmp_path / f"ckpt{d}" / f"{run}.pt", weights_only=True)["state"] for d in (1, 2))
        close(one["strategies"], two["strategies"], f"{run}.strategies")
        close(one["model"], two["model"], f"{run}.model")
