"""Reference tables generated from the code, so that the documentation cannot drift from it.

* :func:`config_keys` walks a config dataclass (by default :class:`medflower.config.ExperimentConfig`)
  and yields one :class:`KeyDoc` per dotted YAML key: type, default, range or choices (from the
  ``rng_field`` metadata and ``Literal`` annotations, see :mod:`medflower.schema`) and the key's
  comment in the source. :func:`experiment_keys_markdown` renders them.
* :func:`strategy_table_markdown` renders the method registry (``medflower.strategies.registry.METHODS``).

The mkdocs hook ``docs/hooks/reference.py`` puts both into the built site; ``tests/test_docs.py``
checks them. This module imports only :mod:`medflower.config` and :mod:`medflower.schema`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from medflower.config import ExperimentConfig
from medflower.config.shift import PRESETS

# Fields of the walked dataclasses that are not YAML keys (set by the loader, refused in a YAML file).
NOT_YAML_KEYS: dict[type, frozenset[str]] = {ExperimentConfig: frozenset({"base_dir"})}
# How a key below a mapping is written in the reference (``privacy.sites.<name>.target_epsilon``).
MAPPING_PLACEHOLDER = "<name>"
_RANGE_KEYS = ("min", "max", "exclusive_min")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One documented key: ``key`` is the dotted YAML path; the other fields are display text."""

    key: str
    type: str
    default: str
    allowed: str  # range ("[0.0, 0.5]", "> 0.0") or choices ("'sgd', 'adam'"); "" if any value of the type
    doc: str  # the field's comment in the source ("" if none)
    group: str  # the "# ---- ... ----" section comment the field sits under ("" if none)
    section: str  # the top-level key it belongs to ("" for top-level scalars)


# ---- values and types as a YAML author sees them ---------------------------------------------------


def yaml_value(value: Any) -> str:
    """A default as it would be written in YAML: ``null``, ``true``, ``[1, 2]``, ``{}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return yaml_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return str(value)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """``int``, ``float | null``, ``list of int``, ``mapping of str to float``, ``str`` (for a Literal of strings)."""
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        kinds = []
        for choice in get_args(tp):
            name = "null" if choice is None else type(choice).__name__
            if name not in kinds:
                kinds.append(name)
        return " | ".join(kinds)
    if _is_union(tp):
        names = [type_name(a) for a in get_args(tp) if a is not type(None)]
        if type(None) in get_args(tp):
            names.append("null")
        return " | ".join(names)
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "list [" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        kt, vt = get_args(tp)
        return f"mapping of {type_name(kt)} to " + ("section" if dataclasses.is_dataclass(vt) else type_name(vt))
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` (possibly inside ``X | None``) allows; () if it is not one."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if _is_union(tp):
        found: tuple[Any, ...] = ()
        for arg in get_args(tp):
            found += _choices(arg)
        return found
    return ()


def allowed_values(tp: Any, meta: Mapping[str, Any]) -> str:
    """Choices of a ``Literal``, or the range in ``rng_field`` metadata, as text; other metadata appended."""
    parts = []
    choices = _choices(tp)
    if choices:
        parts.append(", ".join(repr(c) if isinstance(c, str) else yaml_value(c) for c in choices))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        parts.append(f"{'(' if meta.get('exclusive_min') else '['}{lo}, {hi}]")
    elif lo is not None:
        parts.append(f"{'>' if meta.get('exclusive_min') else '>='} {lo}")
    elif hi is not None:
        parts.append(f"<= {hi}")
    parts += [f"{k}={v!r}" for k, v in meta.items() if k not in _RANGE_KEYS]
    return "; ".join(parts)


# ---- comments in the source: the per-field documentation ------------------------------------------

_HEADER = re.compile(r"^-{2,}\s*(.*?)\s*-*$")  # "# ---- preparation: ... ----"
_LIST_ITEM = re.compile(r"^\s*[*-] ")
_PRAGMA = re.compile(r"^(noqa|type:|pragma|fmt:|TODO|FIXME)\b")


def _class_field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (doc, group)}`` from ``cls``'s own source.

    ``doc`` is the comment block directly above the field plus the comment at the end of its
    line(s); ``group`` is the last ``# ---- title ----`` line above it. Classes without source
    (built at run time) have no comments.
    """
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    cls_node = ast.parse(source).body[0]
    if not isinstance(cls_node, ast.ClassDef):
        return {}
    body = cls_node.body
    fields_at: dict[int, tuple[str, int]] = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            fields_at[node.lineno] = (node.target.id, node.end_lineno or node.lineno)

    src_lines = source.splitlines()
    out: dict[str, tuple[str, str]] = {}
    block: list[str] = []
    group = ""
    lineno = 1
    while lineno <= len(src_lines):
        text = src_lines[lineno - 1].strip()
        if lineno in fields_at:
            name, end = fields_at[lineno]
            inline = [comments[n] for n in range(lineno, end + 1) if n in comments]
            doc = " ".join(c for c in [*block, *inline] if c and not _PRAGMA.match(c))
            out[name] = (doc, group)
            block = []
            lineno = end + 1
            continue
        if text.startswith("#") and lineno in comments:
            header = _HEADER.match(comments[lineno])
            if header:
                group, block = header.group(1), []
            else:
                block.append(comments[lineno])
        else:
            block = []  # a blank line or other code ends a comment block
        lineno += 1
    return out


def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """Comments of every field of ``cls``, inherited fields from the class that declares them."""
    out: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_class_field_comments(klass))
    return out


# ---- the walk -------------------------------------------------------------------------------------


def _default_of(fld: dataclasses.Field[Any]) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return dataclasses.MISSING


def config_keys(cls: type = ExperimentConfig, prefix: str = "", section: str = "", group: str = "") -> Iterator[KeyDoc]:
    """One :class:`KeyDoc` per key of dataclass ``cls``, depth first, nested sections expanded.

    A nested dataclass is a section (its keys follow, ``prefix.key``); a ``dict[str, Dataclass]``
    is a mapping row followed by its entries' keys (``prefix.key.<name>.subkey``). Everything else
    is a leaf row. Keys of a mapping's entries sit in the mapping's ``group`` unless they have their own.
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    hidden = NOT_YAML_KEYS.get(cls, frozenset())
    for fld in dataclasses.fields(cls):
        if not fld.init or fld.name in hidden:
            continue
        tp = hints[fld.name]
        key = f"{prefix}{fld.name}"
        sec = section or (fld.name if dataclasses.is_dataclass(tp) else "")
        doc, own_group = comments.get(fld.name, ("", ""))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from config_keys(tp, f"{key}.", sec)
            continue
        default = _default_of(fld)
        yield KeyDoc(
            key=key,
            type=type_name(tp),
            default="(required)" if default is dataclasses.MISSING else yaml_value(default),
            allowed=allowed_values(tp, fld.metadata),
            doc=doc,
            group=own_group or group,
            section=sec,
        )
        if get_origin(tp) is dict and dataclasses.is_dataclass(get_args(tp)[1]):
            yield from config_keys(get_args(tp)[1], f"{key}.{MAPPING_PLACEHOLDER}.", sec, own_group or group)


# ---- markdown -------------------------------------------------------------------------------------


def rst_to_markdown(text: str) -> str:
    """Docstring text (reStructuredText roles, double backticks) as markdown."""
    text = re.sub(r":(?:mod|class|func|data|meth|attr):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    # markdown needs a blank line before a list that follows a paragraph line
    lines: list[str] = []
    for line in text.splitlines():
        previous = lines[-1] if lines else ""
        if (
            _LIST_ITEM.match(line)
            and previous.strip()
            and not previous.startswith(" ")
            and not _LIST_ITEM.match(previous)
        ):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def _cell(text: str) -> str:
    return rst_to_markdown(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def keys_table(rows: list[KeyDoc]) -> str:
    """A markdown table of ``rows``; a ``group`` change starts a new table under a bold title."""
    out: list[str] = []
    group: str | None = None
    for row in rows:
        if row.group != group:
            group = row.group
            if out:
                out.append("")
            if group:
                out += [f"**{_cell(group)}**", ""]
            out += ["| key | type | default | allowed | comment |", "|---|---|---|---|---|"]
        out.append(
            f"| `{row.key}` | {_cell(row.type)} | {_cell(_code(row.default))} | "
            f"{_cell(row.allowed)} | {_cell(row.doc)} |"
        )
    return "\n".join(out)


def _docstring(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses puts there when a class has none
        return ""
    return rst_to_markdown(inspect.cleandoc(doc))


def experiment_keys_markdown(cls: type = ExperimentConfig, heading_level: int = 2) -> str:
    """Every key of ``cls``: top-level scalars first, then one heading per section with its docstring."""
    rows = list(config_keys(cls))
    hints = typing.get_type_hints(cls)
    hashes = "#" * heading_level
    parts: list[str] = []
    top = [r for r in rows if not r.section]
    if top:
        parts += [f"{hashes} Top level", "", keys_table(top), ""]
    for fld in dataclasses.fields(cls):
        section_rows = [r for r in rows if r.section == fld.name]
        if not section_rows:
            continue
        parts += [f"{hashes} `{fld.name}`", ""]
        doc = _docstring(hints[fld.name])
        if doc:
            parts += [doc, ""]
        parts += [keys_table(section_rows), ""]
    return "\n".join(parts).rstrip() + "\n"


def _params_cell(params: type) -> str:
    hints = typing.get_type_hints(params)
    cells = []
    for fld in dataclasses.fields(params):
        default = _default_of(fld)
        text = f"`{fld.name}`"
        if default is not dataclasses.MISSING:
            text += f" = `{yaml_value(default)}`"
        allowed = allowed_values(hints[fld.name], fld.metadata)
        if allowed:
            text += f" ({allowed})"
        cells.append(text)
    return "<br>".join(cells) if cells else "–"


def strategy_table_markdown(methods: Mapping[str, Any]) -> str:
    """The strategy table from a method registry ``{name: Method}``.

    A ``Method`` has ``name``, ``summary`` (one line), ``params`` (a dataclass of ``rng_field``
    fields), ``privacy`` (``{mode: None if compatible else the reason}``), ``secure_aggregation``
    (None if compatible, else the reason) and ``source`` ("Flower" or "medflower"). Refusals are
    listed under the table with their reasons.
    """
    out = [
        "| name | what it does | `params` (default, allowed) | privacy modes "
        "| sum-only server (secure aggregation, planned) | models | source |",
        "|---|---|---|---|---|---|---|",
    ]
    refusals: list[str] = []
    for key, method in methods.items():
        modes = []
        for mode, reason in method.privacy.items():
            modes.append(f"`{mode}` {'yes' if reason is None else 'no'}")
            if reason is not None:
                refusals.append(f"* `{key}` with `privacy.mode: {mode}`: {_cell(reason)}")
        secagg = "yes" if method.secure_aggregation is None else "no"
        if method.secure_aggregation is not None:
            refusals.append(f"* `{key}` with secure aggregation (planned): {_cell(method.secure_aggregation)}")
        out.append(
            f"| `{key}` | {_cell(method.summary)} | {_params_cell(method.params)} | "
            f"{', '.join(modes) or '–'} | {secagg} | {_cell(getattr(method, 'models', 'any'))} | "
            f"{_cell(method.source)} |"
        )
    if refusals:
        out += ["", "Combinations that are refused, and why:", "", *refusals]
    return "\n".join(out) + "\n"


def shift_presets_markdown() -> str:
    """The scanner-shift presets (``medflower.config.shift.PRESETS``): every number, as the code holds it."""
    out = ["| preset | parameters |", "|---|---|"]
    for name, params in PRESETS.items():
        text = ", ".join(f"{k}={yaml_value(v)}" for k, v in params.items()) or "no change"
        out.append(f"| `{name}` | {_cell(text)} |")
    return "\n".join(out) + "\n"
