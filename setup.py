"""Lists the Cython extensions; everything else lives in pyproject.toml.

``HYPERCACHE_DEBUG=1`` builds with bounds checks, line tracing and no optimisation.
"""

import os
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

extensions = [
    Extension(
        f"hypercache._core.{pyx.stem}",
        [str(pyx)],
        define_macros=macros,
        extra_compile_args=cflags,
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
