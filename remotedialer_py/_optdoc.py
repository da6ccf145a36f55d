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


# -- the options as TypedDicts, for type checkers --------------------------------

TYPED_MODULE = "remotedialer_py/option_types.py"
# What each kind of the engine's table takes (seconds: int or float).
_KIND_TYPES = {"seconds": "float", "seconds_or_off": "float", "count": "int", "size": "int",
               "bool": "bool", "header": "str", "host": "str",
               "path": "Union[str, os.PathLike[str]]"}


def typed_options_source() -> str:
    """remotedialer_py/option_types.py: ``ServerOptions`` and
    ``ClientOptions``, the keyword options of Server and Client (and their
    aio twins) as TypedDicts, so mypy checks ``Server(read_timeout="x")``."""
    out = ['"""The keyword options of Server and Client as TypedDicts, for type checkers.',
           "",
           "Generated from the engine's option table by ``make docs`` (remotedialer_py",
           "._optdoc); tests/test_optdoc.py fails when it differs. At run time the engine",
           'checks every value itself."""',
           "",
           "from __future__ import annotations",
           "",
           "import os",
           "from typing import TypedDict, Union",
           "",
           '__all__ = ["ServerOptions", "ClientOptions"]']
    for cls, who in (("ServerOptions", "server"), ("ClientOptions", "client")):
        out += ["", "", f"class {cls}(TypedDict, total=False):",
                f'    """Keyword options of ``{cls[:-7]}``: see the README\'s options table."""',
                ""]
        for row in _options.rows():
            if row[who]:
                kind = _KIND_TYPES.get(row["kind"])
                if kind is None:
                    raise ValueError(f"option {row['name']}: no Python type for kind {row['kind']}")
                out.append(f"    {row['name']}: {kind}")
                doc = f"{row['meaning']} (default {_default(row)})."
                out.append('    """' + doc.replace("\\", "\\\\").replace('"', "'") + '"""')
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["typed"]:
        sys.exit("usage: python -m remotedialer_py._optdoc typed > " + TYPED_MODULE)
    sys.stdout.write(typed_options_source())
