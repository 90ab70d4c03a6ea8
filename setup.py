"""Build the one extension, lbcore._core, from ext/ (Cython + plain C).

Environment switches:
  LB_DEBUG=1     -O0 -g, LB_DEBUG=1 (LB_ASSERT checks on)
  LB_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (run Python
                 with libasan preloaded: see `make test-sanitize`)
  LB_ANNOTATE=1  write Cython's HTML annotation next to the .pyx
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("LB_DEBUG") == "1"
SANITIZE = os.environ.get("LB_SANITIZE") == "1"

cflags = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O2", "-g0"]
cflags += ["-Wall", "-std=gnu11", "-fno-strict-aliasing", "-pthread"]
ldflags = ["-pthread"]
macros = [("LB_DEBUG", "1" if DEBUG else "0")]
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
           "-fno-sanitize-recover=undefined"]
    cflags += san + ["-O1", "-g"]
    ldflags += san

ext = Extension(
    "lbcore._core",
    sources=["ext/_core.pyx"] + sorted(glob.glob("ext/lb_*.c")),
    include_dirs=["ext"],
    define_macros=macros,
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=sorted(glob.glob("ext/*.h") + glob.glob("ext/*.pxi") + ["ext/lb.pxd"]),
)

setup(
    ext_modules=cythonize(
        [ext],
        include_path=["ext"],
        annotate=os.environ.get("LB_ANNOTATE") == "1",
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
