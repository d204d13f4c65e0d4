"""The README is a landing page whose commands and examples work as written: its two
set-up commands are kept, its first experiment runs and can be compared, its strategy
example runs from a file, and its links lead somewhere."""
import json
import re
import sys
import textwrap
from pathlib import Path

from cl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

QUICKSTART = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
              "cl run experiments/quickstart.yaml")
TESTS = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest'


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_the_two_setup_commands_are_kept():
    commands = [line for block in blocks("bash") for line in block.splitlines()]
    assert QUICKSTART in commands and TESTS in commands
    assert (ROOT / "experiments" / "quickstart.yaml").is_file()


def test_the_diagram_follows_the_data():
    diagram = next(iter(blocks("mermaid")))
    stages = ["Stream", "trainer", "Strategy hooks", "Evaluators", "MLflow"]
    positions = [diagram.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), positions


def test_first_experiment_runs_and_compares(tmp_path, monkeypatch, capsys):
    experiment = next(block for block in blocks("yaml") if block.startswith("name: first-experiment"))
    (tmp_path / "first.yaml").write_text(experiment)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CL_JOURNAL_DIR", str(tmp_path / "cl-journal"))
    assert main(["run", "first.yaml", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [run["name"] for run in result["runs"]] == ["naive", "replay"]
    assert all(len(run["accuracy_matrix"]) == 6 for run in result["runs"])
    compare = next(line for block in blocks("bash") for line in block.splitlines() if line.startswith("cl compare"))
    assert main(compare.split("#")[0].split()[1:]) == 0
    table = capsys.readouterr().out
    assert "naive" in table and "replay" in table


def test_readme_user_strategy_example(tmp_path, monkeypatch, capsys):
    code = next(block for block in blocks("python") if "class L2Anchor" in block)
    usage = re.search(r"```yaml\n(strategies: \[\{name: \"my_strategies:L2Anchor\".*?)```", README.read_text(),
                      re.S).group(1)
    (tmp_path / "my_strategies.py").write_text(code)
    (tmp_path / "exp.yaml").write_text(textwrap.dedent("""
        name: readme-example
        seed: 0
        stream: {dataset: digits, scenario: {name: class_incremental, n_experiences: 5}}
        model: {name: mlp, hidden: [32]}
        training: {epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.05}}
    """) + usage)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_strategies", raising=False)  # another test's module of that name
    assert main(["run", "exp.yaml", "--json", "--no-track", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["name"] == "my_strategies:L2Anchor+replay"
    assert len(result["accuracy_matrix"]) == 6
    assert "l2_anchor" in result["loss_terms"]


def slug(heading: str) -> str:
    """The anchor MkDocs gives a heading."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_links_lead_to_pages_and_headings_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README.read_text())
    local = [(path, anchor) for path, anchor in links if not re.match(r"\w+://", path)]
    assert len(local) >= 10
    for path, anchor in local:
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+?)(?: \{.*\})?$", target.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {path}#{anchor}: no such heading"
