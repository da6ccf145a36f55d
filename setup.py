"""Builds the C extension remotedialer_py._engine (metadata is in pyproject.toml).

The engine links libuv and OpenSSL found through pkg-config. Before compiling we
check every prerequisite and, when one is missing, stop with a single line that
names the Debian package to install, instead of a page of compiler errors.

Environment:
  RD_SANITIZE=1  build with AddressSanitizer and UBSan (load the ASan runtime
                 with LD_PRELOAD to import it into a normal interpreter).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKGS = ("libuv", "openssl")
COMPILE_ARGS = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-fvisibility=hidden"]
SANITIZE_ARGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
# Where the flags of the last build are recorded, so that switching RD_SANITIZE
# on or off rebuilds instead of keeping an extension built the other way.
FLAGS_STAMP = os.path.join(HERE, "build", "rd_build_flags")


def fail(message):
    """Stops the build with one line on stderr."""
    sys.stderr.write(f"remotedialer-py: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def install_hint(package):
    return f"install the Debian package {package} (apt-get install {package})"


def sanitize():
    return os.environ.get("RD_SANITIZE", "") not in ("", "0")


def compiler_command():
    """The C compiler setuptools will use: $CC, else the one Python was built with."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def header_compiles(cc, cflags, header):
    """True when `#include <header>` compiles with these flags (quietly)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(f"#include <{header}>\nint main(void) {{ return 0; }}\n")
        try:
            res = subprocess.run(cc + cflags + ["-fsyntax-only", src],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return res.returncode == 0


def pkg_config(*args):
    res = subprocess.run(["pkg-config", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    return res.returncode, res.stdout.strip()


def check_prerequisites():
    """Returns the pkg-config flags, or stops with the package to install."""
    cc = compiler_command()
    if shutil.which(cc[0]) is None:
        fail(f"C compiler {cc[0]!r} not found; {install_hint('gcc')}")
    python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(python_h):
        fail(f"Python headers not found ({python_h}); {install_hint('python3-dev')}")
    if shutil.which("pkg-config") is None:
        fail(f"pkg-config not found; {install_hint('pkg-config')}")
    if pkg_config("--exists", "libuv")[0] != 0:
        fail(f"libuv not found by pkg-config; {install_hint('libuv1-dev')}")
    if pkg_config("--exists", "openssl")[0] != 0:
        fail(f"openssl not found by pkg-config; {install_hint('libssl-dev')}")
    rc, cflags = pkg_config("--cflags", *PKGS)
    rc2, libs = pkg_config("--libs", *PKGS)
    if rc != 0 or rc2 != 0:
        fail(f"pkg-config --cflags --libs {' '.join(PKGS)} failed; "
             f"{install_hint('libuv1-dev')} and libssl-dev")
    cflags, libs = shlex.split(cflags), shlex.split(libs)
    if not header_compiles(cc, cflags, "uv.h"):
        fail(f"libuv headers not found (uv.h); {install_hint('libuv1-dev')}")
    if not header_compiles(cc, cflags, "openssl/ssl.h"):
        fail(f"OpenSSL headers not found (openssl/ssl.h); {install_hint('libssl-dev')}")
    return cflags, libs


class BuildEngine(build_ext):
    """build_ext that checks prerequisites and applies pkg-config flags only
    when something is actually compiled (not for sdist or metadata)."""

    def build_extensions(self):
        if not all(ext.sources for ext in self.extensions):
            fail("no C sources found in csrc/ (is this a complete checkout?)")
        cflags, libs = check_prerequisites()
        extra_compile = list(COMPILE_ARGS)
        extra_link = []
        if sanitize():
            extra_compile += SANITIZE_ARGS
            extra_link += SANITIZE_ARGS
        for ext in self.extensions:
            for flag in cflags:
                if flag.startswith("-I"):
                    ext.include_dirs.append(flag[2:])
                elif flag.startswith("-D"):
                    name, _, value = flag[2:].partition("=")
                    ext.define_macros.append((name, value or None))
                else:
                    ext.extra_compile_args.append(flag)
            for flag in libs:
                if flag.startswith("-l"):
                    ext.libraries.append(flag[2:])
                elif flag.startswith("-L"):
                    ext.library_dirs.append(flag[2:])
                else:
                    ext.extra_link_args.append(flag)
            ext.extra_compile_args += extra_compile
            ext.extra_link_args += extra_link
        self._force_if_flags_changed(cflags + libs + extra_compile + extra_link)
        super().build_extensions()

    def _force_if_flags_changed(self, flags):
        stamp = "\n".join(flags) + "\n"
        try:
            with open(FLAGS_STAMP) as f:
                if f.read() != stamp:
                    self.force = True
        except OSError:
            self.force = True
        os.makedirs(os.path.dirname(FLAGS_STAMP), exist_ok=True)
        with open(FLAGS_STAMP, "w") as f:
            f.write(stamp)


def sources():
    # Paths relative to setup.py: setuptools refuses absolute source paths.
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.c")))


def headers():
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")))


def license_metadata():
    """Apache-2.0, as the Go library whose protocol the package speaks. Given
    here (pyproject.toml lists it as dynamic) because no one spelling works
    without a warning on every setuptools the build may run with: the SPDX
    string of PEP 639 needs setuptools 77, which deprecates the older
    ``{text = ...}`` table."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "Apache-2.0", "license_files": ["LICENSE"]}
    return {"license": "Apache-2.0", "license_files": ["LICENSE"]}


setup(
    **license_metadata(),
    # Listed here rather than in pyproject.toml, where setuptools < 68 calls
    # [tool.setuptools] "beta" and warns on every build.
    packages=["remotedialer_py"],
    # PEP 561: the package's annotations, and the C extension's stub.
    package_data={"remotedialer_py": ["py.typed", "*.pyi", "dashboard/index.html"]},
    ext_modules=[
        Extension(
            "remotedialer_py._engine",
            sources=sources(),
            depends=headers(),
            include_dirs=["csrc"],
        )
    ],
    cmdclass={"build_ext": BuildEngine},
)
