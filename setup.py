"""Builds shmreplay's compiled engine (shmreplay.engine._native); metadata is in pyproject.toml.

Every ``shmreplay/engine/csrc/*.c`` file goes into the one extension module. A machine without a
C compiler gets a message that says what to install instead of a compiler's stack trace.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = os.path.join("shmreplay", "engine", "csrc")


class BuildEngine(build_ext):
    """build_ext that turns 'no compiler' into an instruction."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils' CompileError, CCompilerError, PlatformError, ...
            if "compiler" in type(exc).__name__.lower() or "command" in str(exc).lower():
                sys.stderr.write(
                    "\nshmreplay: building its C engine failed: " + str(exc) + "\n"
                    "shmreplay needs a C11 compiler and the Python headers to install: "
                    "on Debian/Ubuntu `apt install build-essential python3-dev`, on Fedora "
                    "`dnf install gcc python3-devel`, on macOS `xcode-select --install`.\n"
                )
            raise


engine = Extension(
    "shmreplay.engine._native",
    sources=sorted(glob.glob(os.path.join(CSRC, "*.c"))),
    depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),
    include_dirs=[CSRC],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)

setup(ext_modules=[engine], cmdclass={"build_ext": BuildEngine})
