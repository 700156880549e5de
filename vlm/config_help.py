"""`--help` for the commands that take a config (the trainer, the preflight): every field of `vlm.config`
with its type, default and help, grouped by section, and the seed guide's short flags.

    python launch/train.py --help            # the whole reference
    python launch/train.py --help train      # one section
"""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
import typing

from vlm.config import SECTIONS, SEED_FLAGS


def wants_help(argv: list[str]) -> bool:
    """True when the command line asks for help (`--help` or `-h` anywhere)."""
    return any(arg in ("--help", "-h") or arg.startswith("--help=") for arg in argv)


def help_sections(argv: list[str]) -> list[str]:
    """The sections a `--help SECTION` / `--help=SECTION` names (empty: all)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--help="):
            return [arg.partition("=")[2]]
        if arg in ("--help", "-h") and i + 1 < len(argv) and argv[i + 1] in SECTIONS:
            return [argv[i + 1]]
    return []


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_help(usage: str, sections: list[str] | None = None, width: int | None = None) -> str:
    """The reference text: `usage`, then each section's fields as `--section.name TYPE (default D)` with the
    field's help wrapped under it, then the short flags. Raises KeyError for an unknown section name."""
    width = width or min(110, shutil.get_terminal_size((100, 20)).columns)
    names = sections or list(SECTIONS)
    aliases = {target: short for short, target in SEED_FLAGS.items()}
    lines = [usage.rstrip(), ""]
    for name in names:
        cls = SECTIONS[name]
        lines.append(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key = f"{name}.{field.name}"
            short = f"  (also --{aliases[key]})" if key in aliases else ""
            lines.append(f"  --{key} {_type_name(hints[field.name])}  (default {_default(field)}){short}")
            lines += textwrap.wrap(field.metadata.get("help", ""), width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
        lines.append("")
    lines.append("Values on the command line: --section.key=value or --section.key value; lists comma-separated; "
                 "booleans true/false (a bare flag is true); null for none. A YAML given with --config sets the "
                 "same keys, nested by section; flags override it.")
    return "\n".join(lines)
