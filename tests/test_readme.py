"""The README's worked example of a user strategy runs as written."""
import json
import sys
import re
import textwrap
from pathlib import Path

from cl.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_user_strategy_example(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class L2Anchor" in block)
    usage = re.search(r"```yaml\n(strategies: \[\{name: \"my_strategies:L2Anchor\".*?)```", text, re.S).group(1)
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


def test_readme_python_api_example_assembling_objects(capsys):
    text = README.read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "LifelongTrainer(" in block)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    record = namespace["record"]
    assert record.accuracy_matrix.shape == (6, 5) and record.accuracy_matrix[-1].mean() > 0.3
