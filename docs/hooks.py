"""MkDocs hooks of the documentation site (listed under `hooks:` in mkdocs.yml).

The configuration reference is generated here from the pydantic schema in copd_ray/config.py:
a page that holds the marker `<!-- config-reference -->` gets, in its place, one table per
config section (key, type, default, description). Each field's description is the string
right after it in config.py, so the schema is the one source and no hand-written table can
drift from it.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mkdocs runs from the repository root, not always with copd_ray installed
    sys.path.insert(0, str(REPO))

MARKER = "<!-- config-reference -->"
ANCHOR_PREFIX = "config-"


def on_page_markdown(markdown: str, page=None, config=None, files=None, **kwargs) -> str:
    """Put the generated configuration reference where a page has the marker, its sections one
    heading level below the last heading before the marker."""
    if MARKER not in markdown:
        return markdown
    level = min(_last_heading_level(markdown[: markdown.index(MARKER)]) + 1, 6)
    return markdown.replace(MARKER, render_config_reference(level))


def _last_heading_level(markdown: str) -> int:
    """Level of the last ATX heading, lines inside fenced code blocks (`# a comment`) aside;
    1 when there is none."""
    level, fence = 1, None
    for line in markdown.splitlines():
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = None
        elif stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        else:
            m = re.match(r"(#{1,6})[ \t]", line)
            if m:
                level = len(m.group(1))
    return level


def render_config_reference(level: int = 2) -> str:
    """Markdown for the whole Config schema: the top-level keys, then every section (nested
    ones and list entries included) in the order of the schema, each a table of its keys
    with type, default and description. `level`: the heading level of each section."""
    from copd_ray.config import Config

    out: list[str] = []
    _render_section(Config, "", "Top-level keys", None, level, out)
    return "\n".join(out).rstrip() + "\n"


# -- the walk ----------------------------------------------------------------------------------

def _section_model(annotation: Any) -> tuple[type | None, bool]:
    """(model class, is a list of them) when a field holds a section or a list of sections, with
    or without null; else (None, False)."""
    from pydantic import BaseModel

    annotation = _strip_annotated(annotation)
    for tp in _union_args(annotation) or [annotation]:
        tp = _strip_annotated(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp, False
        if get_origin(tp) is list:
            (item,) = get_args(tp)
            item = _strip_annotated(item)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item, True
    return None, False


def _render_section(model: type, prefix: str, title: str, field_description: str | None, level: int,
                    out: list[str], entries_of: str | None = None) -> None:
    """The heading, intro and table of one section, then (depth first) its sub-sections."""
    out.append(f'<a id="{_anchor(title)}"></a>\n')
    out.append(f"{'#' * level} {'`' + title + '`' if prefix else title}\n")
    intro = _docstring(model) or field_description
    if intro:
        out.append(_escape(intro) + "\n")
    if entries_of:
        out.append(f"Each entry of `{entries_of}` is a mapping with these keys.\n")
    out.append("| Key | Type | Default | Description |")
    out.append("| --- | --- | --- | --- |")
    children = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub, many = _section_model(field.annotation)
        description = _one_line(field.description or "")
        if sub is None:
            type_cell, default_cell = f"`{_type(field.annotation)}`", _default_cell(field)
        else:
            child = key + "[]" if many else key
            link = f"[{'list of sections' if many else 'section'}](#{_anchor(child)})"
            type_cell = link + (" or `null`" if _nullable(field.annotation) else "")
            default_cell = _default_cell(field) if many else "see below"
            children.append((sub, child, field.description, many, key))
        out.append(f"| `{key}` | {type_cell} | {default_cell} | {_escape(description)} |")
    out.append("")
    for sub, child, description, many, key in children:
        _render_section(sub, child + ".", child, description, level, out, entries_of=key if many else None)


# -- formatting --------------------------------------------------------------------------------

def _anchor(title: str) -> str:
    return ANCHOR_PREFIX + (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "top")


def _docstring(model: type) -> str | None:
    doc = model.__dict__.get("__doc__")  # the class's own, never one inherited
    return _one_paragraphs(inspect.cleandoc(doc)) if doc else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _one_paragraphs(text: str) -> str:
    """Lines of a paragraph joined; paragraphs kept apart."""
    return "\n\n".join(_one_line(p) for p in re.split(r"\n\s*\n", text) if p.strip())


def _escape(text: str) -> str:
    """Text safe in a table cell: outside code spans, `|` escaped and `<` written as an entity
    (so `synthetic:<task>` is not taken for an HTML tag)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") and p.endswith("`") and len(p) > 1
                    else p.replace("|", r"\|").replace("<", "&lt;") for p in parts)


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_args(tp: Any) -> list | None:
    if get_origin(tp) in (Union, types.UnionType):
        return list(get_args(tp))
    return None


def _nullable(tp: Any) -> bool:
    return type(None) in (_union_args(_strip_annotated(tp)) or [])


def _type(tp: Any) -> str:
    """A type as a YAML writer reads it: `int | null`, `"hf" | "vllm"`, `list[str]`."""
    tp = _strip_annotated(tp)
    if tp is type(None):
        return "null"
    args = _union_args(tp)
    if args is not None:
        return " | ".join(_type(a) for a in args)
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else _yaml(a) for a in get_args(tp))
    if origin in (list, set, frozenset):
        return f"list[{_type(get_args(tp)[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in get_args(tp)) + "]"
    if origin is dict:
        key, value = get_args(tp)
        return f"dict[{_type(key)}, {_type(value)}]"
    return getattr(tp, "__name__", str(tp))


def _default_cell(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A default as a YAML flow literal: null, true, 0.001, [a, b], {name: add}."""
    import yaml
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a number
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z0-9_.~/][A-Za-z0-9_.~/:-]*", value) and not value.endswith(":")
        return value if plain and yaml.safe_load(value) == value else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(str(k))}: {_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, default=str)
