"""The documentation's configuration reference (docs/hooks.py) is generated from the schema:
every config field is on the page by its dotted key, with its default, and has a
description in the schema. No Ray."""

import importlib.util
import re
import typing

import pytest
import yaml
from pydantic import BaseModel

from conftest import REPO
from copd_ray.config import Config


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models_in(annotation, in_list=False):
    """The pydantic models an annotation holds, each with whether it sits inside a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_list)]
    found = []
    for arg in typing.get_args(annotation):
        found += models_in(arg, in_list or typing.get_origin(annotation) is list)
    return found


def all_fields(model, prefix=""):
    """(dotted key, field) of every field, sections and list entries walked into:
    `model.tiny.vision`, `capabilities[].name`."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append((key, field))
        for sub, in_list in models_in(field.annotation):
            out += all_fields(sub, key + ("[]" if in_list else "") + ".")
    return out


@pytest.fixture(scope="module")
def page():
    return load_hooks().render_config_reference()


def table_rows(page):
    """{key: (type, default, description)} of every table row whose first cell is a key."""
    rows = {}
    for line in page.splitlines():
        m = re.match(r"\| `([^`]+)` \| (.*) \|$", line)
        if m:
            cells = re.split(r" \| (?=[^`]*(?:`[^`]*`[^`]*)*$)", m.group(2))  # `|` inside code spans stays
            assert len(cells) == 3, line
            rows[m.group(1)] = tuple(cells)
    return rows


def test_every_field_is_on_the_page_with_a_description(page):
    fields = all_fields(Config)
    keys = [k for k, _ in fields]
    # The walk reaches every kind of nesting.
    for key in ("run_name", "grpo.lr", "model.tiny.vision", "engine.vllm.max_model_len", "capabilities[].name",
                "branches[].frozen", "topology.edges", "serve.max_top_k"):
        assert key in keys
    assert len(keys) == len(set(keys)) > 100
    rows = table_rows(page)
    missing = [k for k in keys if k not in rows]
    assert not missing, f"not on the page: {missing}"
    assert set(rows) == set(keys), f"on the page but not in the schema: {sorted(set(rows) - set(keys))}"
    undescribed = [k for k, f in fields if not (f.description or "").strip()]
    assert not undescribed, f"fields without a description in copd_ray/config.py: {undescribed}"
    for key, field in fields:
        # The description on the page is the schema's, joined into one line (`<` and `|` escaped).
        on_page = rows[key][2].replace("&lt;", "<").replace("\\|", "|")
        assert on_page == " ".join(field.description.split()), key


def test_defaults_on_the_page_read_back_as_the_schema_defaults(page):
    rows = table_rows(page)
    for key, field in all_fields(Config):
        default = rows[key][1]
        if field.is_required():
            assert default == "required", key
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            continue  # a section: its own table gives its defaults
        assert default.startswith("`") and default.endswith("`"), (key, default)
        expected = [c.model_dump(mode="json", exclude_defaults=True) for c in value] \
            if isinstance(value, list) and value and isinstance(value[0], BaseModel) else value
        assert yaml.safe_load(default[1:-1]) == expected, (key, default)


def test_every_section_has_a_heading_and_its_class_docstring(page):
    assert "## Top-level keys" in page
    for heading in ("`model`", "`model.tiny`", "`capabilities[]`", "`branches[]`", "`engine.vllm`", "`grpo`",
                    "`opd`", "`topology`", "`serve`"):
        assert f"## {heading}\n" in page
    assert Config.model_fields["schedule"].annotation.__doc__.split("\n")[0] in page


def test_the_page_renders_as_four_column_tables(page):
    markdown = pytest.importorskip("markdown")
    html = markdown.markdown(page, extensions=["tables"])
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    assert len(rows) > len(all_fields(Config))  # one per field, plus the header rows
    for row in rows:
        assert len(re.findall(r"<t[dh]>", row)) == 4, row
    assert "<code>synthetic:&lt;task&gt;</code>" in html  # not taken for an HTML tag


def test_the_marker_is_replaced_and_other_pages_are_left_alone():
    hooks = load_hooks()
    text = "# Configuration\n\nBefore.\n\n<!-- config-reference -->\n\nAfter.\n"
    out = hooks.on_page_markdown(text, page=None, config=None, files=None)
    assert "<!-- config-reference -->" not in out
    assert out.startswith("# Configuration\n\nBefore.\n\n") and out.endswith("\nAfter.\n")
    assert "| `grpo.lr` |" in out
    assert "\n## Top-level keys\n" in out and "\n## `grpo`\n" in out  # one level below the page's title
    under = hooks.on_page_markdown("# Configuration\n\n## Every key\n\n```bash\n# a comment, not a heading\n```\n\n"
                                   "<!-- config-reference -->\n")
    assert "\n### Top-level keys\n" in under and "\n### `model.tiny`\n" in under
    plain = "# Other page\n\nNo marker here.\n"
    assert hooks.on_page_markdown(plain, page=None, config=None, files=None) == plain
