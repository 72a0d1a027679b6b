"""Write the configuration reference, docs/config.md, from the pydantic schema of `R3Config`.

    python -m cluster.config_doc            # (re)write docs/config.md
    python -m cluster.config_doc --check    # exit 1 when docs/config.md differs from the schema

Each section of `cluster.config.R3Config` becomes a table of key path, type, default, allowed
values (the values of a `Literal`, the bounds of `ge`/`gt`/`le`/`lt`, `multiple_of`, `min_length`)
and description; a nested section (e.g. `cluster.text_workers`) gets a table of its own. Every
field must have a description: a field without one is refused with its key path.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster.config import R3Config

__all__ = ["DEFAULT_PATH", "render", "main"]

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"

_HEADER = """\
# Configuration reference

<!-- Generated from the config schema (cluster/config.py and its cluster/config_*.py sections) by `python -m cluster.config_doc` (`make docs`); do not edit. -->

A run reads one YAML file (`python -m cluster.train --config FILE`) and then dotted overrides
from the command line (`r3.group_size=8 cluster.text_workers=2`); values are parsed as YAML.
Every key below can be set either way. An unknown key, a value of the wrong type or one outside
the allowed range stops the run before anything starts, with a message naming the key and what
is allowed. Keys not given take the default shown here. No float key accepts NaN or ±inf.
"""


def render(model: type[BaseModel] = R3Config) -> str:
    """The Markdown reference of `model` (default: the whole run config)."""
    out = [_HEADER]
    leaves = _leaf_fields(model, "")
    if leaves:
        out += ["## Top-level keys\n", *_table(leaves)]
    for name, info in model.model_fields.items():
        if _section(info) is not None:
            out += _section_doc(name, info, level=2)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.config_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help=f"output file (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            state = "is missing" if current is None else "is out of date with cluster/config.py"
            print(f"{args.out} {state}; regenerate it with `make docs` (python -m cluster.config_doc)",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------ helpers


def _section(info: FieldInfo) -> type[BaseModel] | None:
    ann = info.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _leaf_fields(model: type[BaseModel], prefix: str) -> list[tuple[str, FieldInfo]]:
    return [(prefix + name, info) for name, info in model.model_fields.items() if _section(info) is None]


def _section_doc(path: str, info: FieldInfo, level: int) -> list[str]:
    model = _section(info)
    about = _description(path, info)
    out = [f"{'#' * level} `{path}`\n", _escape(about[:1].upper() + about[1:]).rstrip(".") + ".\n"]
    leaves = _leaf_fields(model, path + ".")
    if leaves:
        out += _table(leaves)
    for name, sub in model.model_fields.items():
        if _section(sub) is not None:
            out += _section_doc(f"{path}.{name}", sub, level + 1)
    return out


def _table(fields: list[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for path, info in fields:
        cells = (f"`{path}`", _type_name(info.annotation), f"`{_default(info)}`", _allowed(info),
                 _escape(_description(path, info)))
        rows.append("| " + " | ".join(cells) + " |")
    return [*rows, ""]


def _description(path: str, info: FieldInfo) -> str:
    if not (info.description or "").strip():
        raise ValueError(f"config field {path} has no description; give it Field(description=...) in cluster/config.py")
    return info.description.strip()


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(ann, type):
        return ann.__name__
    raise ValueError(f"cannot document the config type {ann!r}; teach cluster.config_doc._type_name about it")


def _default(info: FieldInfo) -> str:
    value = info.default_factory() if info.default_factory is not None else info.default
    return json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)


def _allowed(info: FieldInfo) -> str:
    ann = info.annotation
    literals = [a for arm in (get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,))
                if get_origin(arm) is Literal for a in get_args(arm)]
    parts = [", ".join(f"`{json.dumps(v)}`" for v in literals)] if literals else []
    for c in info.metadata:
        if isinstance(c, at.Gt):
            parts.append(f"> {c.gt}")
        elif isinstance(c, at.Ge):
            parts.append(f">= {c.ge}")
        elif isinstance(c, at.Lt):
            parts.append(f"< {c.lt}")
        elif isinstance(c, at.Le):
            parts.append(f"<= {c.le}")
        elif isinstance(c, at.MultipleOf):
            parts.append(f"multiple of {c.multiple_of}")
        elif isinstance(c, at.MinLen):
            parts.append(f"length >= {c.min_length}")
        else:
            raise ValueError(f"cannot document the constraint {c!r}; teach cluster.config_doc._allowed about it")
    return ", ".join(parts)


def _escape(text: str) -> str:
    """Table cells: a `|` would end the cell and `<name>` would read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<")


if __name__ == "__main__":
    raise SystemExit(main())
