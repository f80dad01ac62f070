"""Lists the Cython extensions; everything else lives in pyproject.toml.

``HYPERCACHE_DEBUG=1`` builds with bounds checks, line tracing and no optimisation.
"""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("HYPERCACHE_DEBUG") == "1"

directives = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "linetrace": DEBUG,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
# Release builds strip the symbols from the shared objects (a third of their size).
ldflags = [] if DEBUG or sys.platform == "darwin" else ["-s"]

extensions = [
    Extension(
        f"hypercache._core.{pyx.stem}",
        [str(pyx)],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for pyx in sorted(Path("hypercache/_core").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        nthreads=os.cpu_count() or 1,
    ),
)
