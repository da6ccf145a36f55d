"""docs/API.md is what remotedialer_py._apidoc prints from the code: the
reference cannot drift from the signatures and docstrings."""

import os
import re
import subprocess
import sys

import pytest

from remotedialer_py import _apidoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGENERATE = "run `make docs` (python -m remotedialer_py._apidoc > docs/API.md)"

pytest.importorskip("prometheus_client", reason="the reference covers remotedialer_py.prometheus")


def test_api_page_is_generated():
    with open(os.path.join(ROOT, "docs", "API.md"), encoding="utf-8") as f:
        committed = f.read()
    text, _ = _apidoc.render()
    assert text == committed, f"docs/API.md is stale: {REGENERATE}"


def test_every_public_name_has_a_docstring():
    _, undocumented = _apidoc.render()
    assert undocumented == [], f"no docstring: {', '.join(undocumented)}"


def test_the_page_covers_the_api():
    text, _ = _apidoc.render()
    import remotedialer_py
    from remotedialer_py import aio

    for name in remotedialer_py.__all__:
        if name in ("errors", "aio"):
            assert f"\n## `remotedialer_py.{name}`\n" in text
        elif name != "__version__":  # exceptions under errors
            assert re.search(rf"^### `(errors\.)?{name}`$", text, re.M), name
    for name in aio.__all__:
        assert f"### `aio.{name}`" in text
    for heading in ("#### `Server.dial`", "#### `aio.Server.dial`", "#### `Client.wait_connected`",
                    "### `prometheus.Collector`", "#### `tunnel_leak_check`",
                    "`--tunnel-leak-check` (command line)", "| `read_timeout` |"):
        assert heading in text, heading


def test_module_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "remotedialer_py._apidoc"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _apidoc.render()[0]
