"""``{{item.…}}`` and ``{{sample.…}}`` in grader and prompt text, as OpenAI documents them.

Two namespaces: ``item`` (the data set row) and ``sample`` (the model's answer:
``output_text``, and ``output_json`` when that text parses as JSON). A path walks objects by
key and arrays by index (``{{item.tags.0}}`` or ``{{item.tags[0]}}``). A string is inserted as
it is, anything else as JSON. A path that names nothing is an error naming it — silently
inserting an empty string would grade every answer against the wrong text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_INDEX = re.compile(r"\[(\d+)\]")


class TemplateError(ValueError):
    """A template names a namespace or field that is not there."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Sample:
    """The ``sample`` namespace: what the model answered."""

    output_text: str
    extra: dict[str, Any] = field(default_factory=dict)

    def namespace(self) -> dict[str, Any]:
        space = {"output_text": self.output_text, **self.extra}
        try:
            space["output_json"] = json.loads(self.output_text)
        except ValueError:
            pass  # no output_json: a template naming it says so
        return space


def paths(template: str) -> list[str]:
    """The placeholder paths in ``template`` (``item.label``, ``sample.output_text`` …)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template)]


def check_namespaces(template: str, allowed: tuple[str, ...] = ("item", "sample")) -> None:
    """Refuse a placeholder outside the namespaces ``allowed`` (before any item is seen)."""
    for path in paths(template):
        head = _parts(path)[0]
        if head not in allowed:
            raise TemplateError(f"The template {{{{{path}}}}} names {head!r}; it may use only "
                                f"{' and '.join(allowed)}.", path)


def lookup(path: str, namespaces: dict[str, Any]) -> Any:
    parts = _parts(path)
    if parts[0] not in namespaces:
        raise TemplateError(f"The template {{{{{path}}}}} names {parts[0]!r}, which is not "
                            f"available here (available: {', '.join(sorted(namespaces))}).",
                            path)
    value = namespaces[parts[0]]
    for depth, part in enumerate(parts[1:], 1):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            missing = ".".join(parts[:depth + 1])
            raise TemplateError(f"The template {{{{{path}}}}} names {missing!r}, which this "
                                f"{parts[0]} does not have.", path)
    return value


def render(template: str, namespaces: dict[str, Any]) -> str:
    """``template`` with every placeholder replaced by its value."""
    def value(match: re.Match[str]) -> str:
        found = lookup(match.group(1), namespaces)
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return _PLACEHOLDER.sub(value, template)


def _parts(path: str) -> list[str]:
    parts = [p for p in _INDEX.sub(r".\1", path).split(".")]
    if not path or any(not p for p in parts):
        raise TemplateError(f"The template {{{{{path}}}}} is not a dotted path like "
                            "item.field.", path)
    return parts
