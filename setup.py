"""Builds shmreplay's compiled engine (shmreplay.engine._native); metadata is in pyproject.toml.

Every ``shmreplay/engine/csrc/*.c`` file goes into the one extension module. A machine without a
C compiler gets a message that says what to install instead of a compiler's stack trace.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = os.path.join("shmreplay", "engine", "csrc")


class BuildEngine(build_ext):
    """build_ext that says what to install when the compiler or the Python headers are missing,
    instead of a compiler's stack trace."""

    def build_extensions(self) -> None:
        compiler = self.compiler.compiler_so[0] if hasattr(self.compiler, "compiler_so") else None
        problem = None
        include = sysconfig.get_paths()["include"]
        if compiler is not None and shutil.which(compiler) is None:
            problem = f"no C compiler found (tried {compiler!r}; set CC to use another)"
        elif not os.path.exists(os.path.join(include, "Python.h")):
            problem = f"the Python headers are missing (no Python.h in {include})"
        if problem is not None:
            raise SystemExit(
                f"shmreplay: cannot build its C engine: {problem}. shmreplay needs a C11 compiler "
                "and the Python headers to install: on Debian/Ubuntu `apt install build-essential "
                "python3-dev`, on Fedora `dnf install gcc python3-devel`, on macOS "
                "`xcode-select --install`."
            )
        super().build_extensions()


engine = Extension(
    "shmreplay.engine._native",
    sources=sorted(glob.glob(os.path.join(CSRC, "*.c"))),
    depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),
    include_dirs=[CSRC],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)

setup(ext_modules=[engine], cmdclass={"build_ext": BuildEngine})
