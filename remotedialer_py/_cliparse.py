"""The command line's argument parser and value checks, shared by every
subcommand.

``Parser`` is argparse with this command's conventions; subcommands made with
``add_subparsers().add_parser(...)`` get them without asking:

- an error names the flag as the user typed it (``-listen`` or ``--listen``)
  under the subcommand's own usage, ``remotedialer-py server: error:
  --listen: ...``, exit status 2;
- an unknown argument after a subcommand is that subcommand's error
  (argparse leaves it to the top level, whose usage lists no flag of it);
- a ``GoBool`` flag also takes Go's ``-flag=true`` / ``-flag=false``;
- ``needs("--a", "--b")``: ``--a`` given without ``--b`` is an error.

The value checks raise ``argparse.ArgumentTypeError`` with what is wrong; the
parser puts the flag in front. Everything here is pure Python: no engine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, NoReturn, Optional, Sequence

from . import _options, _proxy


class GoBool(argparse.Action):
    """A boolean flag that also takes Go's ``-flag=true``/``-flag=false``."""

    VALUES = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, True)


_ARGUMENT_ERROR = re.compile(r"argument (\S+): (.*)", re.S)


class Parser(argparse.ArgumentParser):
    """The top-level parser; its subcommands are ``Subcommand`` parsers."""

    # True for a subcommand: arguments it does not know are its own error.
    _strict = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._needs: list[tuple[str, str]] = []
        self._argv: list[str] = []

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", Subcommand)
        return super().add_subparsers(**kwargs)

    def needs(self, flag: str, other: str) -> None:
        """``flag`` given (not left at its default) without ``other`` is an
        error: ``FLAG needs OTHER``."""
        self._needs.append((flag, other))

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(self._go_bools(self._argv), namespace)
        if extras and self._strict:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        for flag, other in self._needs:
            if self._given(namespace, flag) and not self._given(namespace, other):
                self.error(f"{self.typed(flag)} needs {other}")
        return namespace, extras

    def _given(self, namespace: argparse.Namespace, flag: str) -> bool:
        action = self._option_string_actions[flag]
        return getattr(namespace, action.dest, action.default) != action.default

    def _go_bools(self, argv: list[str]) -> list[str]:
        """Go's ``-debug=false`` in a form argparse understands: argparse
        cannot give an optional value to a flag without letting it eat the
        next argument, which Go's bool flags never do."""
        names = {s for a in self._actions if isinstance(a, GoBool) for s in a.option_strings}
        out = []
        for i, arg in enumerate(argv):
            if arg == "--":
                out.extend(argv[i:])
                break
            head, sep, value = arg.partition("=")
            if sep and head in names:
                flag = GoBool.VALUES.get(value.lower())
                if flag is None:
                    self.error(f"{head}: invalid boolean value {value!r} (true or false)")
                if flag:
                    out.append(head)
                continue
            out.append(arg)
        return out

    def typed(self, flag: str) -> str:
        """The spelling of ``flag`` (or of the argument named ``a/b``) that
        the command line used, e.g. ``-listen`` for ``--listen``."""
        names = flag.split("/")
        action = self._option_string_actions.get(names[0])
        if action is not None:
            names = list(action.option_strings)
        for arg in self._argv:
            if arg == "--":
                break
            for name in names:
                if arg == name or arg.startswith(name + "="):
                    return name
        return names[0]

    def error(self, message: str) -> NoReturn:
        match = _ARGUMENT_ERROR.fullmatch(message)
        if match:
            message = f"{self.typed(match.group(1))}: {match.group(2)}"
        super().error(message)


class Subcommand(Parser):
    """A subcommand's parser: what it does not know is its error."""

    _strict = True


# -- value checks (argparse ``type=``) ------------------------------------------

def _number(value: str, kind: type, what: str) -> Any:
    try:
        n = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
    if n != n:  # NaN
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
    return n


def positive_int(value: str) -> int:
    n = _number(value, int, "an integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return int(n)


def non_negative_int(value: str) -> int:
    n = _number(value, int, "an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {n}")
    return int(n)


def positive_float(value: str) -> float:
    n = _number(value, float, "a number")
    if not 0 < n < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return float(n)


def non_negative_float(value: str) -> float:
    n = _number(value, float, "a number")
    if not 0 <= n < float("inf"):
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return float(n)


def input_file(value: str) -> str:
    """A file to read (a PEM file, a token table): readable now, so that a
    typo is reported here and not once the server starts."""
    if not value:
        raise argparse.ArgumentTypeError("needs a file name")
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value!r}: {exc.strerror}") from None
    return value


def output_file(value: str) -> str:
    """A file to write: its directory must exist (a long run should not find
    out at its end)."""
    if not value:
        raise argparse.ArgumentTypeError("needs a file name")
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} is a directory")
    parent = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: no directory {parent!r}")
    return value


def ws_url(value: str) -> str:
    """A server URL the engine will accept (its rules: _options.parse_ws_url)."""
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in value):
        raise argparse.ArgumentTypeError(f"invalid server URL {value!r}: contains whitespace "
                                         f"or control characters")
    try:
        _options.parse_ws_url(value)
    except _options.AddrError as exc:
        if exc.kind == "bad_scheme":
            raise argparse.ArgumentTypeError(
                f"invalid server URL {value!r}: expected ws://HOST[:PORT]/PATH") from None
        raise argparse.ArgumentTypeError(f"invalid server URL {value!r}: "
                                         f"{exc.kind.replace('_', ' ')} in {exc.text!r}") from None
    return value


def http_url(value: str) -> str:
    """``forward --server``: the server's http:// or https:// URL."""
    if not value.startswith(("http://", "https://")) or any(
            c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in value):
        raise argparse.ArgumentTypeError(
            f"invalid server URL {value!r}: expected http(s)://HOST[:PORT][/PREFIX]")
    return value


def proxy_url(value: str) -> str:
    """``--proxy``: an http:// proxy, or ``""`` for none."""
    if value == "":
        return value
    try:
        _proxy.parse_proxy_url(value, "proxy")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("proxy: ")) from None
    return value


def header_value(value: str) -> str:
    """Text sent as a header value: one line (CR/LF would inject headers)."""
    if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in value):
        raise argparse.ArgumentTypeError(f"{value!r} contains control characters")
    return value
