"""MkDocs hook: fills the reference pages from the code at build time, so they cannot drift.

A page asks for a generated section with a marker comment on a line of its own,
`<!-- generated: NAME -->`, NAME one of `GENERATORS`:

- `strategy-catalogue`: every entry of `strategies.STRATEGIES`, grouped by module, with the
  paper its docstring cites, every constructor argument with its type and default, the
  hooks it implements, a line of YAML and its docstring;
- `strategy-hooks`, `strategy-rules`: the hooks of `strategies.Strategy`, each linked to its
  example on `HOOK_EXAMPLES`, and the rules `strategies.base` states for them;
- `experiment-file`: every key of an experiment file, from the pydantic classes under
  `ExperimentConfig` (types, constraints, defaults, descriptions);
- `components`: the datasets, scenarios and models a file may name, with their arguments;
- `command-line`: every `cl` command and option, from the command's own parser.

`SOURCES` says where each reads from. Docstrings in this project are plain text, not
Markdown: `plain_text_to_markdown` keeps their paragraphs, lists and indented equations and
escapes what Markdown would otherwise read as emphasis, links or HTML.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import re
import types
import typing

import yaml

# Where in the code each generated section reads from: the one place to update when a
# module moves.
SOURCES = {
    "strategies": "strategies:STRATEGIES",                    # name -> Strategy subclass
    "strategy_base": "strategies:Strategy",
    "experiment": "cl.config.schema:ExperimentConfig",        # the root of an experiment file
    "datasets": "streams:DATASETS",
    "scenarios": "streams:SCENARIOS",
    "models": "cl.models:MODELS",
    "scenario_injected": "cl.config.arguments:SCENARIO_INJECTED",  # arguments the lab fills in itself
    "model_injected": "cl.config.arguments:MODEL_INJECTED",
    "parser": "cl.cli.parser:build_parser",                   # () -> argparse.ArgumentParser of `cl`
}


def source(key: str):
    """The object `SOURCES[key]` names."""
    import importlib

    module, _, attr = SOURCES[key].partition(":")
    return getattr(importlib.import_module(module), attr)


log = logging.getLogger("mkdocs.hooks.reference")  # a warning here fails `mkdocs build --strict`

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)

# "Buzzega et al. 2020", "Li and Hoiem 2016", "Zenke, Poole and Ganguli 2017", "Hägele et al. 2024"
_NAME = r"[A-Z][\w'\-]+"
AUTHOR_YEAR = re.compile(rf"{_NAME}(?:(?:, {_NAME})*,? and {_NAME}| et al\.)? (?:19|20)\d\d\b")


# ------------------------------------------------------------------ plain-text docstrings
_ESCAPE = str.maketrans({"*": r"\*", "_": r"\_", "[": r"\[", "]": r"\]", "<": "&lt;", ">": "&gt;",
                         "\\": "\\\\", "|": r"\|", "#": r"\#", "&": "&amp;"})


def escape_inline(text: str) -> str:
    """Markdown-escape prose, leaving `code spans` as they are."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") and p.endswith("`") and len(p) > 1 else p.translate(_ESCAPE)
                   for p in parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


_ITEM = re.compile(r"^(\s*)(?:[-*]|\d+\.)\s+")


def plain_text_to_markdown(doc: str) -> str:
    """A plain-text docstring as Markdown: paragraphs joined, `- ` and `1. ` lists kept as
    lists, blocks indented deeper than their paragraph (equations) kept verbatim as code."""
    lines = inspect.cleandoc(doc).splitlines()
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line.rstrip())
        elif blocks[-1]:
            blocks.append([])
    out: list[str] = []
    base = 0  # indentation of the prose around: a block deeper than it is an equation
    for block in (b for b in blocks if b):
        indent = min(_indent(line) for line in block)
        if indent > base and not _ITEM.match(block[0]):
            text = "\n".join(line[indent:] for line in block)
            out.append(f"```text\n{text}\n```")
            continue
        base = indent if not _ITEM.match(block[0]) else base
        out.append(_prose_block(block))
    return "\n\n".join(out)


def _prose_block(block: list[str]) -> str:
    """A block of prose: paragraph lines joined, list items kept (an item's indented
    continuation lines joined to it)."""
    entries: list[list[str]] = []  # [marker ("" for a paragraph), text]
    for line in block:
        item = _ITEM.match(line)
        if item:
            entries.append(["1." if line.strip()[0].isdigit() else "-", line[item.end():].strip()])
        elif entries and (not entries[-1][0] or _indent(line) > 0):
            entries[-1][1] += " " + line.strip()
        else:
            entries.append(["", line.strip()])
    parts: list[str] = []
    for i, (marker, text) in enumerate(entries):
        if i and (marker, entries[i - 1][0]) != ("-", "-") and not (marker == "1." == entries[i - 1][0]):
            parts.append("")  # Markdown needs a blank line around a list
        parts.append(f"{marker} {escape_inline(text)}" if marker else escape_inline(text))
    return "\n".join(parts)


def first_paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def citation(doc: str | None) -> str | None:
    """The paper a docstring cites: the first parenthesis of its first paragraph that names
    authors and a year, else the first "Authors year" anywhere in it."""
    doc = inspect.cleandoc(doc or "")
    head = first_paragraph(doc)
    for group in _parentheses(head):
        if AUTHOR_YEAR.search(group):
            return group
    m = AUTHOR_YEAR.search(" ".join(doc.split()))
    return m.group(0) if m else None


def _parentheses(text: str) -> list[str]:
    """The top-level parenthesised groups of `text`, without their parentheses."""
    groups, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth == 1:
                start = i + 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                groups.append(text[start:i])
    return groups


# ------------------------------------------------------------------------ annotations
def type_name(annotation) -> str:
    """An annotation as a reader writes it: `int | None`, `'a' | 'b'`, `list[int]`."""
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _code(text: str) -> str:
    """`text` as a code span (a table's pipes inside a code span need no escape)."""
    return "`" + text.replace("`", "'") + "`" if text else ""


# ----------------------------------------------------------------- strategy catalogue
def strategy_hooks() -> list[str]:
    """The hooks a strategy may implement: the public methods of `Strategy` other than its
    state and naming methods."""
    skip = {"state_dict", "load_state_dict", "state_bytes", "describe"}
    return [name for name, value in vars(source("strategy_base")).items()
            if callable(value) and not name.startswith("_") and name not in skip]


def strategy_arguments(cls) -> list[inspect.Parameter]:
    """The constructor's arguments, their annotations resolved where they can be (the
    modules use `from __future__ import annotations`, so they are strings until then)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: show it as written
        hints = {}
    return [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(cls).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# Families in the order a newcomer meets them; a module not named here follows, in registry order.
FAMILY_ORDER = ["naive", "replay", "der", "er_ace", "gdumb", "mixed_replay", "power_law_rehearsal", "gem",
                "regularization", "lwf", "icarl", "nearest_mean", "slca", "prompting", "momentum", "schedules"]


def strategy_families() -> dict[str, list[tuple[str, type]]]:
    """Registered strategies grouped by the module (or sub-package) of `strategies` they live in."""
    families: dict[str, list[tuple[str, type]]] = {}
    for name, cls in dict(source("strategies")).items():
        module = cls.__module__.split(".")
        family = module[1] if module[0] == "strategies" and len(module) > 1 else cls.__module__
        families.setdefault(family, []).append((name, cls))
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return dict(sorted(families.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def strategy_catalogue() -> str:
    import importlib

    Strategy = source("strategy_base")
    hooks = strategy_hooks()
    families = strategy_families()
    out = ["| name | class | paper |", "| --- | --- | --- |"]
    for members in families.values():
        for name, cls in members:
            paper = citation(cls.__doc__)
            out.append(f"| [`{name}`](#{_anchor(name)}) | `{cls.__name__}` | "
                       f"{escape_inline(paper) if paper else '—'} |")
    for family, members in families.items():
        module = members[0][1].__module__
        try:
            intro = first_paragraph(importlib.import_module(".".join(module.split(".")[:2])).__doc__)
        except ImportError:
            intro = ""
        title, _, rest = intro.partition(": ")
        out += ["", f"## {escape_inline(title.rstrip('.') or family)}", ""]
        if rest:
            out += [escape_inline(rest[:1].upper() + rest[1:]), ""]
        for name, cls in members:
            out += _strategy_entry(name, cls, hooks, Strategy)
    return "\n".join(out) + "\n"


def _strategy_entry(name: str, cls, hooks: list[str], base) -> list[str]:
    """One strategy: what it is (its docstring's first paragraph), its paper, arguments,
    hooks and a line of YAML, then the rest of its docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "(no description)")
    lead, rest = _lead(doc)
    paper = citation(doc)
    out = ["", f"### `{name}` {{ #{_anchor(name)} }}", "",
           f"`{cls.__module__}.{cls.__qualname__}` · **Paper:** "
           + (escape_inline(paper) if paper else "none cited"), "",
           plain_text_to_markdown(lead), ""]
    params = strategy_arguments(cls)
    if params:
        out += ["| argument | type | default |", "| --- | --- | --- |"]
        for p in params:
            default = "required" if p.default is p.empty else _code(repr(p.default))
            out.append(f"| `{p.name}` | {_code(type_name(p.annotation))} | {default} |")
    else:
        out.append("Takes no arguments.")
    out.append("")
    implemented = [h for h in hooks if getattr(cls, h) is not getattr(base, h)]
    facts = [f"**Hooks:** {', '.join(f'`{h}`' for h in implemented) or 'none'}"]
    for flag, meaning in (("task_free", "task-free (never told where experiences end)"),
                          ("owns_lr", "owns the learning rate"),
                          ("needs_features", "needs the batch's pooled features"),
                          ("frozen_features", "keeps the backbone frozen (its features are computed once)")):
        if getattr(cls, flag, False):
            facts.append(meaning)
    out += [" · ".join(facts), ""]
    example = {"name": name, **{p.name: p.default for p in params if p.default is not p.empty}}
    out += ["```yaml\nstrategies: [" + _flow(example) + "]   # every argument at its default\n```", ""]
    if rest.strip():
        out.append(plain_text_to_markdown(rest))
    return out


def _lead(doc: str) -> tuple[str, str]:
    """A docstring's opening, up to the first paragraph that ends a sentence (an equation
    the first sentence leads into stays with it), and the rest."""
    blocks = doc.split("\n\n")
    for i, block in enumerate(blocks):
        if block.rstrip().endswith(".") and not block.startswith(" "):
            return "\n\n".join(blocks[: i + 1]), "\n\n".join(blocks[i + 1:])
    return doc, ""


def _anchor(name: str) -> str:
    return "strategy-" + name.replace("_", "-")


def _flow(value) -> str:
    """A value in YAML's flow style, on one line."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # a scalar's end-of-document mark


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -------------------------------------------------------------- experiment file reference
def config_classes(root) -> dict[type, list[str]]:
    """`root` and every pydantic class its fields use, in the order a reader meets them,
    each with the YAML key paths where it appears (`stream.scenario`, `strategies[]`)."""
    from pydantic import BaseModel

    paths: dict[type, list[str]] = {}

    def visit(cls, path: str):
        first = cls not in paths
        paths.setdefault(cls, []).append(path)
        if first:
            for name, field in cls.model_fields.items():
                for inner, inner_path in _model_paths(field.annotation, f"{path}.{name}".lstrip(".")):
                    if issubclass(inner, BaseModel):
                        visit(inner, inner_path)

    visit(root, "")
    return paths


def _model_paths(annotation, prefix: str) -> list[tuple[type, str]]:
    """The classes an annotation holds, each with its key path: `list[X]` -> `prefix[]`,
    `dict[str, X]` -> `prefix.<key>`."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return [(annotation, prefix)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        return [pair for a in args if a is not Ellipsis for pair in _model_paths(a, prefix + "[]")]
    if origin is dict:
        return _model_paths(args[1], prefix + ".<key>") if len(args) == 2 else []
    return [pair for a in args for pair in _model_paths(a, prefix)]


def _config_type(annotation, classes) -> str:
    """The type of a config field, with a link to the section of a config class it names."""
    text = type_name(annotation)
    linked = [cls for cls in classes if re.search(rf"\b{cls.__name__}\b", text)]
    if not linked:
        return _code(text)
    for cls in linked:
        text = re.sub(rf"\b{cls.__name__}\b", f"[{cls.__name__}](#{cls.__name__.lower()})", text)
    return text.replace("|", "\\|")


def _constraints(field) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least", "max_length": "at most"}
    out = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                unit = (" item" if value == 1 else " items") if "length" in attr else ""
                out.append(f"{word} {value}{unit}")
    return ", ".join(out)


def _config_default(field) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        if type(value).model_config.get("extra") == "allow":  # a component: {name: ..., its arguments}
            return _code(_flow(value.model_dump()))
        return "every key at its default"
    return _code(_flow(value))


# What a key means, for the keys `cl.config.schema` gives no description of (its own
# description wins once it has one). A note for a key that no longer exists is a warning,
# which fails the strict build: rename or remove it here.
NOTES = {
    "ExperimentConfig.name": "MLflow experiment name",
    "ExperimentConfig.seed": "data order, initialisation, strategies' sampling (and the stream's, unless "
                             "`stream.seed` is set)",
    "ExperimentConfig.data_dir": "where datasets are read and downloaded; default `$CL_DATA_DIR`, else "
                                 "`~/.cache/cl-lab/data`",
    "ExperimentConfig.stream": "what the runs learn from: a dataset cut into experiences by a scenario",
    "ExperimentConfig.model": "`mlp`, `reduced_resnet18`, `byte_gpt`, a `module:Class` path or any timm model "
                              "name, with its arguments; `multihead: true` gives one head per task; "
                              "`weights: FILE` loads a local weights file (all but the classifier)",
    "ExperimentConfig.training": "epochs, batch size, optimizer, scheduler and the evaluation cadence",
    "ExperimentConfig.strategies": "the strategies of the file's one run, composed in list order",
    "ExperimentConfig.runs": "run label -> its strategies: several runs compared in one command, one child "
                             "MLflow run each under one parent",
    "StreamConfig.dataset": "the dataset a scenario splits (see the components below); omitted for scenarios "
                            "that take their own datasets (`multi_dataset`, `token_stream`, `avalanche`)",
    "StreamConfig.scenario": "how the dataset becomes a stream of experiences (see the components below)",
    "StreamConfig.online": "cut every experience into small ones, each seen once (online, task-free learning)",
    "ComponentSpec.name": "a registered name, a `module:attr` path, or the name of an entry point",
    "TrainingConfig.epochs": "passes over each experience's training data",
    "TrainingConfig.batch_size": "rows per training batch from the stream (strategies may append more)",
    "TrainingConfig.eval_batch_size": "rows per batch when evaluating",
    "TrainingConfig.optimizer": "any `torch.optim` class by case-insensitive name, with its arguments",
    "TrainingConfig.scheduler": "any `torch.optim.lr_scheduler` class by name, with its arguments, e.g. "
                                "`{name: cosineannealinglr, T_max: steps}`; not beside a strategy that owns "
                                "the learning rate",
    "TrainingConfig.scheduler_interval": "step the scheduler after every epoch, or after every iteration",
    "SweepConfig.method": "`grid`: every combination of the listed values; `random`: `samples` draws",
    "SweepConfig.mode": "whether the highest or the lowest objective wins",
    "SweepRange.low": "lower end of the range",
    "SweepRange.high": "upper end of the range",
    "SweepRange.log": "draw log-uniformly (needs 0 < low)",
    "SweepRange.integer": "round every draw to a whole number",
}


def experiment_file_reference() -> str:
    paths = config_classes(source("experiment"))
    classes = list(paths)
    known = {f"{cls.__name__}.{name}" for cls in classes for name in cls.model_fields}
    for key in sorted(set(NOTES) - known):
        log.warning(f"docs/hooks/reference.py: NOTES names '{key}', which the experiment file no longer has")
    out = []
    for cls in classes:
        where = ", ".join(f"`{p}`" for p in paths[cls] if p) or "the top level of the file"
        out += [f"## {cls.__name__} {{ #{cls.__name__.lower()} }}", ""]
        out.append(f"*Where:* {where}." + (
            " Keys not listed below are refused." if cls.model_config.get("extra") == "forbid" else
            " Every key other than those below is passed on as an argument."))
        out.append("")
        if cls.__doc__ and cls.__doc__ is not cls.__mro__[1].__doc__:
            out += [plain_text_to_markdown(cls.__doc__), ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in cls.model_fields.items():
            text = " ".join((field.description or "").split())
            description = escape_inline(text or NOTES.get(f"{cls.__name__}.{name}", ""))
            kind = _config_type(field.annotation, classes)
            limits = _constraints(field)
            out.append(f"| `{name}` | {kind}{f' ({limits})' if limits else ''} | {_config_default(field)} | "
                       f"{description} |")
        out.append("")
    return "\n".join(out)


def components_reference() -> str:
    """The datasets, scenarios and models an experiment file may name, with their arguments."""
    kinds = [("Datasets", "stream.dataset", source("datasets"), {"data_dir"}),
             ("Scenarios", "stream.scenario", source("scenarios"), set(source("scenario_injected"))),
             ("Models", "model", source("models"), set(source("model_injected")))]
    out = []
    for title, key, registry, injected in kinds:
        out += [f"### {title} (`{key}`) {{ #components-{title.lower()} }}", "",
                "| name | arguments | what it is |", "| --- | --- | --- |"]
        for name, obj in dict(registry).items():
            args = []
            for p in inspect.signature(obj).parameters.values():
                if p.name in injected or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                args.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
            arguments = "<br>".join(_code(a) for a in args) or "—"
            out.append(f"| `{name}` | {arguments} | {escape_inline(_first_sentence(obj.__doc__))} |")
        out.append("")
    return "\n".join(out)


def _first_sentence(doc: str | None) -> str:
    text = first_paragraph(doc)
    end = re.search(r"(?<!\bal)\.(?=\s+[A-Z`(]|$)", text)  # "et al." does not end a sentence
    return text if end is None else text[: end.start() + 1]


# ----------------------------------------------------------------------- the hook API
# The page with a runnable example of every hook, under the heading `{ #hook-<name> }`
# (`hook_anchor`): the hook table links each hook there, so the strict build fails when a
# hook has no example.
HOOK_EXAMPLES = "guide/context.md"


def hook_anchor(name: str) -> str:
    return "hook-" + name.replace("_", "-")


def strategy_hooks_table(page: str = HOOK_EXAMPLES) -> str:
    """Every hook of `Strategy`, with its arguments, what its docstring says of it, and a
    link to its example, relative to `page` (the page the table is on)."""
    import posixpath

    base = source("strategy_base")
    examples = posixpath.relpath(HOOK_EXAMPLES, posixpath.dirname(page) or ".")
    examples = "" if examples == posixpath.basename(page) else examples  # on the examples page itself
    out = ["| hook | when it is called, and what it may do | example |", "| --- | --- | --- |"]
    for name in strategy_hooks():
        params = [p for p in inspect.signature(getattr(base, name)).parameters if p != "self"]
        doc = first_paragraph(getattr(base, name).__doc__) or "(no description)"
        out.append(f"| `{name}({', '.join(params)})` | {escape_inline(doc)} | "
                   f"[example]({examples}#{hook_anchor(name)}) |")
    return "\n".join(out) + "\n"


def strategy_rules() -> str:
    """The rules of the hooks as `strategies.base` states them: its module docstring from
    the call order on (the paragraphs before it say what the hook table already does)."""
    import importlib

    doc = inspect.cleandoc(importlib.import_module(source("strategy_base").__module__).__doc__ or "")
    start = doc.find("Call order")
    rules = doc[start:] if start >= 0 else doc.partition("\n\n")[2]
    return plain_text_to_markdown(rules.replace("::\n", ":\n")) + "\n"


# ------------------------------------------------------------------------- command line
def command_line_reference() -> str:
    parser = source("parser")()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = ["| command | what it does |", "| --- | --- |"]
    out += [f"| [`cl {name}`](#cl-{name}) | {escape_inline(helps.get(name) or '')} |" for name in sub.choices]
    for name, command in sub.choices.items():
        out += ["", f"## `cl {name}` {{ #cl-{name} }}", "", escape_inline(helps.get(name) or ""), ""]
        out.append("```text\n" + command.format_usage().strip().replace("usage: ", "", 1) + "\n```")
        rows = []
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(action.option_strings) or action.dest
            if action.option_strings and action.nargs != 0:
                flags += " " + (action.metavar or action.dest.upper())
            detail = action.help or ""
            if action.choices:
                detail += f" (one of: {', '.join(map(str, action.choices))})"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                    and "default" not in detail:
                detail += f" (default: {action.default})"
            rows.append(f"| `{flags}` | {escape_inline(detail)} |")
        if rows:
            out += ["", "| argument | meaning |", "| --- | --- |", *rows]
    return "\n".join(out) + "\n"


GENERATORS = {
    "strategy-catalogue": strategy_catalogue,
    "experiment-file": experiment_file_reference,
    "components": components_reference,
    "strategy-hooks": strategy_hooks_table,
    "strategy-rules": strategy_rules,
    "command-line": command_line_reference,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{page.file.src_uri}: no generator named '{name}' (known: {', '.join(GENERATORS)})")
        generator = GENERATORS[name]
        # A generator with a `page` parameter links to other pages relative to this one.
        if "page" in inspect.signature(generator).parameters:
            return generator(page=page.file.src_uri)
        return generator()

    return MARKER.sub(fill, markdown)
