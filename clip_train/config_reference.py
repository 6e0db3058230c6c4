"""The configuration reference (docs/configuration.md), generated from `clip_train/config.py`.

The comments under the dataclass fields of config.py are the single source of every key's
documentation (torchtitan's way): this module reads them from the source with `ast` (the comment
lines right under a field), takes types as written there and defaults from the dataclasses
themselves, and prints one Markdown page grouped by section, nested sections (`model.aug`) and
the entries of the evaluation maps included. `clip-train config --reference` prints it; a test
fails when the committed page differs.

Fields written one after the other with no comment between them share the comment under the last
of them (`image_mean` / `image_std`, `beta1` / `beta2` / `eps`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
from dataclasses import dataclass

from clip_train import config as config_module
from clip_train.config import Config, EvalSet

NESTED = "the section below"  # the default shown for a nested section
REGENERATE = "python -m clip_train config --reference > docs/configuration.md"


@dataclass
class Key:
    name: str  # the full dotted key, e.g. model.aug.scale
    type: str  # the annotation as written in config.py
    default: str  # as YAML spells it
    comment: str  # the comment under the field ('' when it shares the next field's)


def _class_nodes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(inspect.getsource(config_module))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _field_comments(node: ast.ClassDef, lines: list[str]) -> dict[str, str]:
    """{field name: the comment lines right under it, joined into one paragraph}."""
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        text = []
        for line in lines[stmt.end_lineno:]:  # end_lineno is 1-based: this is the next line
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            text.append(stripped.lstrip("#").strip())
        out[stmt.target.id] = " ".join(t for t in text if t)
    return out


def _yaml_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _annotations(node: ast.ClassDef, source: str) -> dict[str, str]:
    return {stmt.target.id: ast.get_source_segment(source, stmt.annotation)
            for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def section_keys(cls: type, prefix: str) -> list[tuple[str, list[Key], str]]:
    """[(section name, its keys, its docstring)] for a config dataclass and those nested in it."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    node = _class_nodes()[cls.__name__]
    comments, types = _field_comments(node, lines), _annotations(node, source)
    keys: list[Key] = []
    nested: list[tuple[str, list[Key], str]] = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested.extend(section_keys(type(default), f"{prefix}.{f.name}"))
            shown = NESTED
        else:
            shown = "required" if default is dataclasses.MISSING else _yaml_value(default)
        keys.append(Key(f"{prefix}.{f.name}", types.get(f.name, ""), shown, comments.get(f.name, "")))
    doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    return [(prefix, keys, doc), *nested]


def all_sections() -> list[tuple[str, list[Key], str]]:
    """Every section of Config, in the order of its fields, each followed by its nested ones."""
    out = []
    for f in dataclasses.fields(Config):
        out.extend(section_keys(type(_default(f)), f.name))
    return out


def groups(keys: list[Key]) -> list[list[Key]]:
    """Consecutive keys without a comment of their own join the next commented key."""
    out, pending = [], []
    for key in keys:
        pending.append(key)
        if key.comment:
            out.append(pending)
            pending = []
    if pending:
        out.append(pending)  # trailing keys without any comment: shown as undocumented
    return out


def undocumented() -> list[str]:
    """Keys whose group has no comment at all (a test keeps this empty)."""
    return [k.name for _, keys, _ in all_sections() for g in groups(keys) if not g[-1].comment for k in g]


def _md(text: str) -> str:
    """Escape Markdown outside `code` spans: `*bn*` is a pattern, `<dir>` a placeholder."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([*\\])", r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _render_group(group: list[Key]) -> list[str]:
    heads = [f"**{_code(k.name)}** · {_code(k.type)} · default "
             + (k.default if k.default == NESTED else _code(k.default)) for k in group]
    comment = group[-1].comment or "(undocumented)"
    return ["- " + "<br>\n  ".join(heads) + "<br>", f"  {_md(comment)}", ""]


def render() -> str:
    """The whole page, Markdown."""
    sections = all_sections()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from clip_train/config.py by `clip-train config --reference`: do not edit.",
        f"     Edit the comments under the fields in config.py, then run: {REGENERATE} -->",
        "",
        "Every key of the one config object, as `section.key`, with its type, its default and the",
        "comment under it in `clip_train/config.py` (this page is generated from there, and a test",
        "checks that it is up to date). Set keys in a YAML file (`--config`) or as dotted overrides",
        "on the command line (`optim.lr=1e-3`); unknown keys, wrong types and impossible values are",
        "refused before anything heavy starts, with the key named. `clip-train config --config C.yaml",
        "[key=value ...]` prints the resolved config.",
        "",
        "Sections: " + ", ".join(f"[`{name}`](#{name.replace('.', '')})" for name, _, _ in sections)
        + ", [evaluation entries](#evaluation-entries).",
        "",
    ]
    for name, keys, doc in sections:
        out += [f"## {name}", ""]
        if doc:
            out += [_md(" ".join(doc.split())), ""]
        for group in groups(keys):
            out += _render_group(group)
    out += [
        "## Evaluation entries",
        "",
        "`eval.zeroshot`, `eval.retrieval` and `eval.validation` take one data set (a string) or a map",
        "of named entries, e.g. `eval.zeroshot.imagenet.data=/datasets/imagenet/val`. Each entry is a",
        "string (its `data`) or a map with these keys (`classnames` and `templates`: zero-shot only):",
        "",
    ]
    for group in groups(section_keys(EvalSet, "eval.zeroshot.<name>")[0][1]):
        out += _render_group(group)
    return "\n".join(out).rstrip() + "\n"
