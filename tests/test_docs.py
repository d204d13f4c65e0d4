"""The documentation site: it builds with no warning, its generated strategy catalogue
matches the registered strategies, its tutorials and the strategy-writing guide run as
written, that guide covers every hook and every member of the context, and every full
experiment file it shows is valid.

Tutorials (and the runnable guide pages, `RUNNABLE`) run in a fresh folder with an MLflow store of their own, block by block in
page order, as a reader would: a code block with a title (```yaml title="x.yaml"```)
is a file the reader saves; a `cl ...` line of a bash block is a command they type
(all but `cl ui`, a server); an untitled python block is code they run, in one
namespace per page. The first `cl run FILE` of each experiment file runs as a separate
`python -m cl` process, as typed; an experiment file no bash line runs is run that way
when it is saved.
"""
from __future__ import annotations

import html
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cl
import strategies
from cl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
# Guide pages whose code runs as written too: the strategy-writing guide's example of every hook.
HOOK_GUIDE = DOCS / "guide" / "context.md"
RUNNABLE = TUTORIALS + [HOOK_GUIDE]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def fenced_blocks(text: str) -> list[tuple[str, str | None, str]]:
    """(language, title or None, body) of every fenced code block, in page order."""
    out = []
    for lang, attrs, body in FENCE.findall(text):
        title = re.search(r'title="([^"]+)"', attrs)
        out.append((lang, title.group(1) if title else None, body))
    return out


def is_experiment(text: str) -> bool:
    data = yaml.safe_load(text)
    return isinstance(data, dict) and {"name", "stream", "model"} <= set(data)


def run_cl_process(args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"cl {' '.join(args)} failed:\n{result.stderr[-3000:]}"


# ------------------------------------------------------------------------------ the build
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    return out


def test_site_builds_strictly_with_every_page(site):
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    for page in pages(nav):
        built = site / (page[: -len(".md")] + "/index.html" if not page.endswith("index.md") else page[:-3] + ".html")
        assert built.is_file(), f"{page} was not built"


# --------------------------------------------------------------------- strategy catalogue
def catalogue_sections(site: Path) -> dict[str, str]:
    """Strategy name -> the text of its section on the built catalogue page."""
    page = (site / "reference" / "strategies" / "index.html").read_text()
    article = page[page.index("<article"): page.index("</article>")]
    sections = {}
    for chunk in re.split(r"(?=<h3 )", article)[1:]:
        name = re.match(r"<h3[^>]*><code>([^<]+)</code>", chunk)
        if name:
            sections[name.group(1)] = chunk.split("<h2", 1)[0]
    return sections


def text_of(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def cited(doc: str) -> tuple[str, str] | None:
    """(surname, year) of the first author-year citation of a docstring, its first
    paragraph preferred: "Buzzega et al. 2020" -> ("Buzzega", "2020")."""
    doc = inspect.cleandoc(doc or "")
    pattern = re.compile(r"([A-Z][\w'-]+)(?: et al\.)? ((?:19|20)\d\d)\b")
    for text in (doc.split("\n\n")[0], doc):
        m = pattern.search(" ".join(text.split()))
        if m:
            return m.group(1), m.group(2)
    return None


def test_catalogue_lists_every_strategy_with_its_arguments_and_paper(site):
    sections = catalogue_sections(site)
    assert set(sections) == set(strategies.STRATEGIES), "the catalogue and strategies.STRATEGIES differ"
    for name, cls in strategies.STRATEGIES.items():
        assert f"{cls.__module__}.{cls.__qualname__}" in text_of(sections[name])
        cells = r"<tr>\s*<td><code>([^<]+)</code></td>\s*<td>.*?</td>\s*<td>(.*?)</td>\s*</tr>"
        table = {arg: text_of(default) for arg, default in re.findall(cells, sections[name], re.S)}
        arguments = [p for p in inspect.signature(cls).parameters.values()
                     if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert list(table) == [p.name for p in arguments], f"{name}: arguments {list(table)}"
        for p in arguments:
            assert table[p.name] == ("required" if p.default is p.empty else repr(p.default)), f"{name}.{p.name}"
        paper = text_of(re.search(r"<strong>Paper:</strong>(.*?)</p>", sections[name], re.S).group(1))
        citation = cited(cls.__doc__)
        if citation is None:
            assert paper.startswith("none cited"), f"{name}: {paper}"
        else:
            surname, year = citation
            assert surname in paper and year in paper, f"{name}: expected {surname} {year} in the paper line: {paper}"


# ------------------------------------------------------------------------------- tutorials
@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for every tutorial (each names its own experiment): a fresh store's
    schema is made once."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_tutorial_runs_as_written(page, tmp_path, monkeypatch, tracking_uri):
    blocks = fenced_blocks(page.read_text())
    assert any(lang == "python" for lang, _, _ in blocks), f"{page.name} has no Python to run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the reader's modules, saved beside their experiments
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("CL_JOURNAL_DIR", str(tmp_path / "cl-journal"))
    for _, title, _ in blocks:
        if title and title.endswith(".py"):
            monkeypatch.delitem(sys.modules, title[:-3], raising=False)  # another page's module of that name

    commands = [shlex.split(line, comments=True) for lang, _, body in blocks if lang == "bash"
                for line in body.splitlines() if line.startswith("cl ")]
    run_by_command = {c[2] for c in commands if c[1:2] == ["run"]}
    started: set[str] = set()
    namespace: dict = {"__name__": "__tutorial__"}
    for i, (lang, title, body) in enumerate(blocks):
        if title:
            (tmp_path / title).write_text(body)
            if lang == "yaml" and is_experiment(body) and title not in run_by_command:
                run_cl_process(["run", title], tmp_path)
        elif lang == "python":
            exec(compile(body, f"{page.name} (python block {i + 1})", "exec"), namespace)
        elif lang == "bash":
            for line in body.splitlines():
                if not line.startswith("cl "):
                    continue
                args = shlex.split(line, comments=True)[1:]
                if args[0] == "ui":
                    continue  # a server
                if args[0] == "run" and args[1] not in started:
                    started.add(args[1])
                    run_cl_process(args, tmp_path)
                else:
                    assert main(args) == 0, f"{page.name}: {line}"


def test_tutorial_experiments_are_tiny():
    """Tutorials run in the test suite: digits, one epoch, a small MLP."""
    for page in TUTORIALS:
        for lang, title, body in fenced_blocks(page.read_text()):
            if lang == "yaml" and title and is_experiment(body):
                data = yaml.safe_load(body)
                assert data["stream"]["dataset"] == "digits", f"{page.name}: {title}"
                assert data["training"]["epochs"] == 1, f"{page.name}: {title}"
                assert data["model"]["name"] == "mlp" and max(data["model"]["hidden"]) <= 64, f"{page.name}: {title}"


# ------------------------------------------------------------------ the strategy guide
def reference_hook():
    """The site's build hook, `docs/hooks/reference.py`, as a module (it is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_strategy_guide_has_an_example_of_every_hook():
    hook = reference_hook()
    assert hook.HOOK_EXAMPLES == HOOK_GUIDE.relative_to(DOCS).as_posix()
    text = HOOK_GUIDE.read_text()
    missing = [name for name in hook.strategy_hooks() if f"{{ #{hook.hook_anchor(name)} }}" not in text]
    assert not missing, f"{HOOK_GUIDE.name} has no example heading for the hooks {missing}"


def test_the_strategy_guide_names_every_member_of_the_context():
    import torch

    from strategies.context import Context

    model = torch.nn.Linear(2, 2)
    ctx = Context(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    members = {n for n in vars(ctx) if not n.startswith("_")}
    members |= {n for n in vars(Context) if not n.startswith("_")}
    text = HOOK_GUIDE.read_text()
    missing = sorted(n for n in members if f"`ctx.{n}" not in text)
    assert not missing, f"{HOOK_GUIDE.name} does not say what these members of Context are: {missing}"


# ------------------------------------------------------------------- examples elsewhere
def test_every_full_experiment_shown_outside_the_tutorials_is_valid(tmp_path):
    pages = [p for p in DOCS.rglob("*.md") if p.parent.name != "tutorials"] + [ROOT / "README.md"]
    checked = 0
    for page in pages:
        for lang, _, body in fenced_blocks(page.read_text()):
            if lang == "yaml" and is_experiment(body):
                cl.load(yaml.safe_load(body))  # raises ConfigError, naming the key, if the docs drifted
                checked += 1
    assert checked >= 2
