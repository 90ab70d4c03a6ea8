"""Build the extension lbcore._core from ext/ (Cython + plain C).

Environment switches:
  LB_TESTING=1   also build lbcore._testing (ext/_testing.pyx): benchmark and
                 stress loops over _core's objects, for tests and bench/ only;
                 the Makefile's build, test-sanitize and bench targets set it
  LB_DEBUG=1     -O0 -g, LB_DEBUG=1 (LB_ASSERT checks on)
  LB_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (run Python
                 with libasan preloaded: see `make test-sanitize`)
  LB_ANNOTATE=1  write Cython's HTML annotation next to the .pyx
  LB_URING=0     build without io_uring even where liburing is installed (the
                 TUN worker then always uses read()/write())

The TUN worker uses io_uring when liburing (Debian: liburing-dev) is found at
build time; it is linked statically where liburing.a exists, so that a wheel
runs on a machine without liburing. Without it the build still succeeds and
the worker uses plain read()/write().
"""
import glob
import os
import shlex
import subprocess
import sysconfig
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup

TESTING = os.environ.get("LB_TESTING") == "1"
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



def find_uring() -> list[str] | None:
    """The link arguments for liburing, or None when it cannot be compiled and linked
    against here: a test program tells, not the presence of files."""
    if os.environ.get("LB_URING") == "0":
        return None
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    try:
        static = subprocess.run(cc + ["-print-file-name=liburing.a"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    candidates = ([[static]] if os.path.isabs(static) and os.path.exists(static) else [])
    candidates.append(["-luring"])
    prog = ("#include <liburing.h>\nint main(void) { struct io_uring r;"
            " return io_uring_queue_init(8, &r, 0) == 0 ? 0 : 1; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(prog)
        for libs in candidates:
            try:
                r = subprocess.run(cc + [src, "-o", os.path.join(tmp, "t")] + libs,
                                   capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                return None
            if r.returncode == 0:
                return libs
    return None


URING = find_uring()
if URING is not None:
    macros.append(("LB_HAVE_URING", "1"))
    ldflags += URING

C_SOURCES = sorted(glob.glob("ext/lb_*.c"))
DEPENDS = sorted(glob.glob("ext/*.h") + glob.glob("ext/*.pxi") + ["ext/lb.pxd",
                                                                "lbcore/_core.pxd"])


def extension(name: str, pyx: str) -> Extension:
    # lbcore._testing links its own copy of the C core: extension modules
    # do not share C symbols, and its loops call the same functions the
    # data plane runs, on the structs behind _core's objects
    return Extension(name, sources=[pyx] + C_SOURCES, include_dirs=["ext"],
                     define_macros=macros, extra_compile_args=cflags,
                     extra_link_args=ldflags, depends=DEPENDS)


extensions = [extension("lbcore._core", "ext/_core.pyx")]
if TESTING:
    extensions.append(extension("lbcore._testing", "ext/_testing.pyx"))

setup(
    ext_modules=cythonize(
        extensions,
        # ext for lb.pxd and the .pxi parts; the root for lbcore/_core.pxd
        include_path=["ext", "."],
        annotate=os.environ.get("LB_ANNOTATE") == "1",
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
