"""How a bad experiment file is reported: one error type, and pydantic's errors as
lines that name the file, the key and what was expected."""
from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """An experiment file that cannot be run; the message names file, key and expectation."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid experiment"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
