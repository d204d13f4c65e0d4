"""A weight penalty too stiff for SGD is named, where its importances are computed and in
the non-finite error, instead of the learning rate alone (issue 24).

Split-Digits, an MLP, SGD at lr 0.05 with momentum 0.9, 5 experiences: EWC and online EWC
at their default strength (100) diverge in the last experience, MAS at its default (1) in
the second with batches of 16. The limit (`_QuadraticPenalty.stability_note`): the penalty
scale * lambda * Omega (theta - theta*)^2 has curvature h = 2 scale lambda Omega, and
heavy-ball SGD is stable iff lr h < 2 (1 + momentum) = 3.8.
"""
from __future__ import annotations

import re

import pytest
from conftest import tiny_experiment

from cl.cli.main import main

NOTE = re.compile(r"after experience (\d) of 5, (\w+)'s penalty at strength ([\d.e+-]+) is past SGD's stability "
                  r"limit, so training may diverge: its largest importance ([\d.e+-]+) gives the curvature "
                  r"([\d.e+-]+), .* passes 2 \(1 \+ momentum 0.9\) = 3.8; a strength of ([\d.e+-]+) or less is stable")


def run(tmp_path, capsys, strategy, **settings):
    path = tiny_experiment(tmp_path, f"{strategy['name']}.yaml", lr=0.05, momentum=0.9, n_experiences=5,
                           strategies=[strategy], **settings)
    code = main(["run", str(path), "--no-track", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, strength, scale, settings", [
    ("ewc", 100, 0.5, {}),
    ("online_ewc", 100, 0.5, {}),
    ("mas", 1, 1.0, {"batch_size": 16}),
])
def test_a_penalty_past_the_stability_limit_is_named_before_and_in_the_error(tmp_path, capsys, name, strength,
                                                                              scale, settings):
    code, out, err = run(tmp_path, capsys, {"name": name}, **settings)  # the default strength
    assert code == 1
    lines = err.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("cl: warning: ") and NOTE.search(line)]
    failed = [i for i, line in enumerate(lines) if line.startswith("cl: error: ")]
    assert warned and failed and warned[0] < failed[0], err  # said when the importances were computed
    first = NOTE.search(lines[warned[0]])
    experience, cls, said_strength, largest, curvature, stable = first.groups()
    assert cls == {"ewc": "EWC", "online_ewc": "OnlineEWC", "mas": "MAS"}[name]
    assert float(said_strength) == strength
    failure = re.search(r"non-finite training loss \(\w+\) in experience (\d) of 5", lines[failed[0]])
    assert failure and int(experience) < int(failure.group(1))  # before the failure
    # curvature 2 scale lambda Omega_max; the stable strength is 0.9 of the limit's, to two digits
    assert float(curvature) == pytest.approx(2 * scale * strength * float(largest), rel=1e-3)
    assert float(stable) == pytest.approx(0.9 * 3.8 / (0.05 * 2 * scale * float(largest)), rel=0.05)
    assert float(stable) < strength
    # the error blames the penalty (the first experience past the limit), not the learning rate
    assert first.group(0) in lines[failed[0]] and "the learning rate may be too high" not in err


def test_a_stable_penalty_says_nothing(tmp_path, capsys):
    code, out, err = run(tmp_path, capsys, {"name": "ewc", "strength": 10.0})
    assert code == 0 and "stability limit" not in err + out and "warning" not in err


def test_the_limit_follows_the_optimizer():
    """2 (1 + m) for heavy-ball SGD, 2 (1 + m) / (1 + 2 m) with Nesterov momentum, lr (1 - dampening)
    with dampening; nothing for an optimizer the quadratic analysis does not cover (Adam)."""
    from types import SimpleNamespace

    import torch

    from strategies.regularization import MAS

    model = torch.nn.Linear(2, 1)
    mas = MAS(strength=1.0)
    mas.set_anchor({n: torch.full_like(p, 10.0) for n, p in model.named_parameters()},
                   {n: p.detach().clone() for n, p in model.named_parameters()})  # curvature 2 * 1 * 10 = 20

    def note(optimizer):
        return mas.stability_note(SimpleNamespace(model=model, optimizer=optimizer))

    sgd = torch.optim.SGD
    assert note(sgd(model.parameters(), lr=0.18, momentum=0.9)) is None  # 3.6 < 3.8
    assert "a strength of 0.85 or less is stable" in note(sgd(model.parameters(), lr=0.2, momentum=0.9))  # 4; 3.42 / 4
    assert note(sgd(model.parameters(), lr=0.06, momentum=0.9, nesterov=True)) is None  # 1.2 < 3.8 / 2.8
    assert note(sgd(model.parameters(), lr=0.07, momentum=0.9, nesterov=True)) is not None  # 1.4 > 1.357
    assert note(sgd(model.parameters(), lr=0.2, momentum=0.9, dampening=0.5)) is None  # 0.1 x 20 = 2 < 3.8
    assert note(sgd(model.parameters(), lr=0.11)) is not None  # 2.2 > 2
    assert note(torch.optim.Adam(model.parameters(), lr=10.0)) is None
