"""`cl strategies`, `cl models`, `cl datasets`, `cl scenarios` and `cl streams`: what the
registries hold, one line each, or one component in full."""
from __future__ import annotations

import re


def list_command(args) -> int:
    """The registered components of a kind (`args.command`), or the one `args.name` names in full."""
    if args.name is not None:
        return _show(args.command, args.name, _registry(args.command).get(args.name))
    _list(args.command)
    return 0


def streams_command(args) -> int:
    _list("scenarios")
    print(f"{'(stream) blurry':<20} share of each experience handed to the next one (blurry boundaries)")
    print(f"{'(stream) online':<20} {{experience_size: N}}: cut every experience into small ones, seen once each")
    return 0


def _registry(kind: str):
    from cl.config.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES

    return {"strategies": STRATEGIES, "models": MODELS, "datasets": DATASETS, "scenarios": SCENARIOS}[kind]


def _list(kind: str) -> None:
    for name, obj in _registry(kind).items().items():
        print(f"{name:<20} {_summary(obj.__doc__)}")
    if kind == "models":
        print(f"{'<timm name>':<20} any timm model, e.g. vit_tiny_patch16_224 (pretrained: true, or weights: FILE)")


def _show(kind: str, name: str, obj) -> int:
    """One component in full: its docstring (the paper and equation), its arguments with
    their types and defaults, and where it is defined."""
    import inspect
    import textwrap

    from cl.config.arguments import MODEL_INJECTED, SCENARIO_INJECTED

    injected = {"models": MODEL_INJECTED, "scenarios": SCENARIO_INJECTED, "datasets": {"data_dir"}}.get(kind, set())
    print(name)
    print(textwrap.indent(inspect.cleandoc(obj.__doc__ or "(no description)"), "  "))
    print("arguments:")
    shown = 0
    for p in inspect.signature(obj).parameters.values():
        if p.name in injected or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = "" if p.annotation is p.empty else f": {_annotation(p.annotation)}"
        default = " (required)" if p.default is p.empty else f" = {p.default!r}"
        print(f"  {p.name}{hint}{default}")
        shown += 1
    if not shown:
        print("  (none)")
    try:
        print(f"defined in {inspect.getsourcefile(obj)}")
    except TypeError:
        pass
    return 0


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring, on one line."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)\.(?=\s+[A-Z`(]|$)", text)  # "et al." does not end a sentence
    return text if end is None else text[: end.start() + 1]
