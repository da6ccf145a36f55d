"""The README's option tables, generated from the engine's table.

`remotedialer-py options` prints them; `remotedialer-py options --readme
README.md` rewrites the README's generated blocks; tests/test_optdoc.py fails
when the README differs from what this prints.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from . import _options

MIB = 1 << 20
# The README blocks this module owns, by name.
BEGIN = "<!-- BEGIN generated {name} table: remotedialer-py options --readme README.md -->"
END = "<!-- END generated {name} table -->"


def _default(row: Mapping[str, Any]) -> str:
    if row["default_text"] is not None:
        return row["default_text"]
    kind, value = row["kind"], row["default"]
    if kind == "seconds_or_off" and value == 0:
        return "off"
    if kind in ("seconds", "seconds_or_off"):
        return f"{value:g}"
    if kind == "size" and value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    return str(value)


def _who(row: Mapping[str, Any]) -> str:
    if row["server"] and row["client"]:
        return "both"
    return "Server" if row["server"] else "Client"


def options_table() -> str:
    """Every option: name, which objects take it, default, meaning."""
    lines = ["| option | for | default | meaning |", "|---|---|---|---|"]
    for row in _options.rows():
        lines.append(f"| `{row['name']}` | {_who(row)} | {_default(row)} | {row['meaning']} |")
    return "\n".join(lines)


def limits_table() -> str:
    """The options that bound what a peer can make us hold, and what a peer
    past one gets."""
    lines = ["| option | default | the offender gets |", "|---|---|---|"]
    for row in _options.rows():
        if row["limit"] is None:
            continue
        who = _who(row)
        name = f"`{row['name']}` (both)" if who == "both" else f"`{who}({row['name']}=)`"
        lines.append(f"| {name} | {_default(row)} | {row['limit']} |")
    return "\n".join(lines)


TABLES = {"options": options_table, "limits": limits_table}


def _block(name: str) -> "re.Pattern[str]":
    return re.compile(re.escape(BEGIN.format(name=name)) + r"\n(?:.*?\n)?" +
                      re.escape(END.format(name=name)), re.S)


def render_readme(text: str) -> str:
    """`text` with each generated block replaced by what the table says now.
    Raises ValueError when a block's markers are missing."""
    for name, make in TABLES.items():
        block = f"{BEGIN.format(name=name)}\n{make()}\n{END.format(name=name)}"
        text, n = _block(name).subn(lambda _: block, text)
        if n != 1:
            raise ValueError(f"expected one generated {name} block, found {n}")
    return text
