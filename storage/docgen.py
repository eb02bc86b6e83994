"""Generated parts of README.md: the JSON field reference (from the docstrings of
storage/records.py) and the StoreConfig table (from storage/config.py), so the README
cannot drift from the code. ``python -m storage.docgen README.md`` rewrites the
parts between their markers; tests/storage/test_docgen.py fails when they differ.

Reads source files with ``ast``; never imports product code for side effects.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import storage.config as config_module
import storage.records as records_module

MARKERS = {
    "fields": ("<!-- generated: fields (python -m storage.docgen README.md) -->", "<!-- end generated: fields -->"),
    "config": ("<!-- generated: config (python -m storage.docgen README.md) -->", "<!-- end generated: config -->"),
}


def _documented(cls: ast.ClassDef) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) of each annotated attribute followed by a docstring."""
    out = []
    body = cls.body
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        doc = ""
        if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(getattr(body[i + 1], "value", None), ast.Constant):
            doc = " ".join(str(body[i + 1].value.value).split())  # type: ignore[attr-defined]
        default = "required"
        if node.value is not None:
            v = node.value
            if isinstance(v, ast.Call) and any(k.arg == "default_factory" for k in v.keywords):
                fac = next(k.value for k in v.keywords if k.arg == "default_factory")
                default = {"list": "[]", "dict": "{}"}.get(ast.unparse(fac), ast.unparse(fac) + "()")
            else:
                default = ast.unparse(v)
        out.append((node.target.id, ast.unparse(node.annotation), default, doc))
    return out


def _classes(module) -> dict[str, ast.ClassDef]:
    tree = ast.parse(inspect.getsource(module))
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def _json_default(value: object) -> str:
    import msgspec

    if value is msgspec.NODEFAULT:
        return "required"
    return msgspec.json.encode(value).decode()


def _struct_defaults(t: type) -> dict[str, str]:
    import msgspec

    out = {}
    for f in msgspec.structs.fields(t):
        d = f.default if f.default is not msgspec.NODEFAULT else (
            f.default_factory() if f.default_factory is not msgspec.NODEFAULT else msgspec.NODEFAULT)
        out[f.name] = _json_default(d)
    return out


def _type(typ: str) -> str:
    return typ.replace("Action", '"allow" | "block" | "log"')


def field_reference() -> str:
    """Markdown: the common fields, then one table per record kind."""
    classes = _classes(records_module)
    lines = ["Every record is one JSON object (`linewarden query --json`, `export`, the uplink):",
             "flat snake_case fields plus `kind`. Times (`ts`, `ts_end`, `login_ts`, ...) are",
             "integers, microseconds since the Unix epoch, UTC. Absent values are `null`.", "",
             "#### Fields of every record", "", "| field | type | default | meaning |", "|---|---|---|---|",
             "| `kind` | `str` | | The record kind: the heading of each table below. |"]
    base = _struct_defaults(records_module.Record)
    for name, typ, _default, doc in _documented(classes["Record"]):
        lines.append(f"| `{name}` | `{_cell(_type(typ))}` | `{_cell(base[name])}` | {_cell(doc)} |")
    for t in records_module.RECORD_TYPES:
        cls = classes[t.__name__]
        tag = t.__struct_config__.tag  # type: ignore[attr-defined]
        lines += ["", f"#### `{tag}`: {' '.join((ast.get_docstring(cls) or '').split())}", "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        defaults = _struct_defaults(t)
        for name, typ, _default, doc in _documented(cls):
            lines.append(f"| `{name}` | `{_cell(_type(typ))}` | `{_cell(defaults[name])}` | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    import dataclasses

    cls = _classes(config_module)["StoreConfig"]
    defaults = {f.name: f.default for f in dataclasses.fields(config_module.StoreConfig)}
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, _typ, _default, doc in _documented(cls):
        lines.append(f"| `{name}` | `{_cell(_json_default(defaults[name]))}` | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


GENERATORS = {"fields": field_reference, "config": config_reference}


def render(text: str) -> str:
    """``text`` with every generated part replaced by its current content."""
    for key, (begin, end) in MARKERS.items():
        pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pat.search(text):
            raise ValueError(f"markers for {key!r} not found")
        body = GENERATORS[key]()
        text = pat.sub(lambda _m: f"{begin}\n{body}{end}", text)
    return text


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    old = path.read_text(encoding="utf-8")
    new = render(old)
    if new != old:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
