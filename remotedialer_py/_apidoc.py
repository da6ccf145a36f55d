"""docs/API.md, generated from the package's docstrings and signatures.

    python -m remotedialer_py._apidoc > docs/API.md     (or: make docs)

tests/test_apidoc.py fails when docs/API.md differs from what this prints, and
when a public name has no docstring. Only ``inspect`` reads the code; the
options tables are _optdoc's, the pytest flags what the plugin registers.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any, Callable, Iterator, Optional

from . import _optdoc

TITLE = "# API reference"
WIDTH = 88  # longer signatures get a line per parameter
INTRO = ("Generated from the docstrings by `python -m remotedialer_py._apidoc > docs/API.md`"
         " (`make docs`); the [README](../README.md) shows the package at work.")

# (module, names documented in it, in order); None: the module's __all__
# without the submodules and the exceptions, which have sections of their own.
SECTIONS: list[tuple[str, Optional[list[str]]]] = [
    ("remotedialer_py", None),
    ("remotedialer_py.events", ["Event"]),
    ("remotedialer_py.errors", ["TunnelError", "ClientNotFoundError", "ClosedError",
                                "TunnelTimeoutError"]),
    ("remotedialer_py.aio", ["Server", "Client", "Forward"]),
    ("remotedialer_py.prometheus", ["Collector"]),
    ("remotedialer_py.pytest_plugin", ["assert_balanced", "LeakCheck"]),
]

# Classes the package makes for you: their constructor is not API.
NOT_CONSTRUCTED = {
    "remotedialer_py.server.Forward": "`Server.forward()` returns it",
    "remotedialer_py.tunnel_socket.TunnelSocket": "`Server.dial()` returns it",
    "remotedialer_py.aio.Forward": "`await aio.Server.forward()` gives it",
    "remotedialer_py.pytest_plugin.LeakCheck": "the `tunnel_leak_check` fixture yields it",
}


def _markdown(doc: str) -> str:
    """reST inline markup of the docstrings, as Markdown."""
    doc = re.sub(r":(?:class|meth|func|attr|mod):`~?([^`]+)`", r"``\1``", doc)
    return doc.replace("``", "`")


def _doc(obj: Any) -> str:
    return _markdown(inspect.getdoc(obj) or "")


def _annotation(value: Any) -> str:
    """An annotation as written, without forward-reference quotes and with
    the package's private module names (``_events.X``) as public ones."""
    if value is inspect.Parameter.empty:
        return ""
    text = value if isinstance(value, str) else inspect.formatannotation(value)
    text = text.replace("'", "").replace('"', "")
    return re.sub(r"\b_(events|server|client)\.", r"\1.", text)


def _signature(fn: Callable[..., Any], name: str, skip_self: bool = False,
               returns: bool = True) -> str:
    """``name(a: int, *, b: str = 'x') -> T`` with the annotations as written."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts = []
    star_done = False
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star_done = "*" + text, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if ann else f"={p.default!r}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params)
                                            or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = f" -> {_annotation(sig.return_annotation)}" \
        if returns and sig.return_annotation is not sig.empty else ""
    one_line = f"{name}({', '.join(parts)}){ret}"
    if len(one_line) <= WIDTH:
        return one_line
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}"


def _code(text: str) -> str:
    return f"```python\n{text}\n```"


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties, the class's own first, then those it
    inherits from the package's base classes (never from socket.socket or
    object), each in definition order."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("remotedialer_py"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
                seen.add(name)
                yield name, value


class _Renderer:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.undocumented: list[str] = []

    def add(self, *blocks: str) -> None:
        self.out.extend(b for b in blocks if b)

    def doc(self, what: str, obj: Any) -> None:
        text = _doc(obj)
        if not text:
            self.undocumented.append(what)
        self.add(text)

    def function(self, name: str, fn: Callable[..., Any], level: str = "###") -> None:
        prefix = "async def " if inspect.iscoroutinefunction(fn) else "def "
        self.add(f"{level} `{name}`", _code(prefix + _signature(fn, name.split(".")[-1])))
        self.doc(name, fn)

    def klass(self, name: str, cls: type) -> None:
        bases = [b for b in cls.__bases__ if b is not object and not b.__name__.startswith("_")]
        heading, short = f"### `{name}`", cls.__name__
        if issubclass(cls, BaseException):
            self.add(heading, _code(f"class {short}({', '.join(b.__name__ for b in bases)})"))
            self.doc(name, cls)
            return
        made_by = NOT_CONSTRUCTED.get(_qualname(cls))
        if made_by:
            base = f"({', '.join(f'{b.__module__}.{b.__name__}' for b in bases)})" if bases else ""
            self.add(heading, _code(f"class {short}{base}"), f"*Not made directly: {made_by}.*")
        else:
            self.add(heading, _code("class " + _signature(cls, short, returns=False)))
        self.doc(name, cls)
        for member, value in _members(cls):
            full = f"{name}.{member}"
            if isinstance(value, property):
                ret = _annotation(inspect.signature(value.fget).return_annotation) \
                    if value.fget is not None and not _is_lambda(value.fget) else ""
                kind = "property" + (f" -> {ret}" if ret else "")
                self.add(f"#### `{full}`", f"*{kind}*" + ("" if value.fset is None
                                                           else ", settable"))
                self.doc(full, value)
            else:
                fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                prefix = "async def " if inspect.iscoroutinefunction(fn) else "def "
                self.add(f"#### `{full}`",
                         _code(prefix + _signature(fn, member, skip_self=True)))
                self.doc(full, fn)


def _is_lambda(fn: Any) -> bool:
    return getattr(fn, "__name__", "") == "<lambda>"


def _public_names(module: Any) -> list[str]:
    """The package's own API: __all__ without the submodules and exceptions
    (each has its section) and without __version__."""
    names = []
    for name in module.__all__:
        value = getattr(module, name)
        if name == "__version__" or inspect.ismodule(value) or \
                (inspect.isclass(value) and issubclass(value, BaseException)):
            continue
        names.append(name)
    return names


class _RecordedOptions:
    """Stands in for pytest's parser in ``pytest_addoption``, recording what
    the plugin registers."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def getgroup(self, name: str, description: str = "") -> "_RecordedOptions":
        return self

    def addoption(self, *names: str, **kwargs: Any) -> None:
        self.rows.append((" / ".join(f"`{n}`" for n in names) + " (command line)",
                          kwargs.get("help", "")))

    def addini(self, name: str, help: str, type: Any = None, default: Any = None) -> None:
        setting = f"`{name} = {'true' if type == 'bool' else 'VALUE'}`"
        self.rows.append((f"{setting} (ini file)", help))


def _fixtures(module: Any) -> list[tuple[str, Any]]:
    """Public fixtures, each with its function (pytest wraps fixtures
    differently from version to version)."""
    out = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if type(value).__name__ == "FixtureFunctionDefinition" or \
                hasattr(value, "_pytestfixturefunction"):
            out.append((name, getattr(value, "__wrapped__", value)))
    return out


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9_ -]", "", title.lower()).replace(" ", "-")


def render() -> tuple[str, list[str]]:
    """The page, and the public names that have no docstring."""
    r = _Renderer()
    titles = [f"`{module}`" for module, _ in SECTIONS] + ["Options"]
    r.add(TITLE, INTRO,
          "\n".join(f"- [{t}](#{_anchor(t)})" for t in titles))
    for module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        r.add(f"## `{module_name}`")
        r.doc(module_name, module)
        if module_name == "remotedialer_py.pytest_plugin":
            r.add("### Fixtures")
            for name, fn in _fixtures(module):
                r.add(f"#### `{name}`")
                r.doc(name, fn)
            options = _RecordedOptions()
            module.pytest_addoption(options)
            r.add("### Flags and ini settings",
                  "| setting | meaning |\n|---|---|\n" +
                  "\n".join(f"| {setting} | {meaning} |" for setting, meaning in options.rows))
        short = module_name.rpartition(".")[2]
        for name in names if names is not None else _public_names(module):
            value = getattr(module, name)
            label = name if module is sys.modules[__package__] else f"{short}.{name}"
            if inspect.isclass(value):
                r.klass(label, value)
            else:
                r.function(label, value)
    r.add("## Options",
          "Keywords of `Server(...)` and `Client(...)` (and of their `aio` twins), from the "
          "engine's own table; `remotedialer-py options` prints the same.",
          _optdoc.options_table(),
          "What bounds what a peer can make the engine hold, and what a peer past a bound "
          "gets:",
          _optdoc.limits_table())
    return "\n\n".join(r.out) + "\n", r.undocumented


def main() -> int:
    text, _ = render()
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
