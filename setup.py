"""Build the cpu backend's C extension (metadata lives in pyproject.toml).

Each instruction-set file is compiled with its own flags and linked into one module; the kernels are
chosen at run time from what the CPU reports (onebit/kernels/cpu/src/dispatch.c). No -march=native:
a wheel built here runs on any CPU of its architecture.
"""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SRC = os.path.join("onebit", "kernels", "cpu", "src")
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fno-strict-aliasing", "-std=gnu11", "-Wall", "-Wno-unused-function"]


def isa_sources() -> list[tuple[str, list[str]]]:
    """(source, extra flags) for every instruction-set file this architecture can compile."""
    machine = platform.machine().lower()
    isas = [("isa_scalar.c", [])]
    if machine in ("x86_64", "amd64", "i686", "i386"):
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl"]
        isas += [("isa_avx2.c", avx2), ("isa_avx512.c", avx512), ("isa_avx512vnni.c", avx512 + ["-mavx512vnni"])]
    elif machine in ("aarch64", "arm64"):
        isas += [("isa_neon.c", []), ("isa_neondot.c", ["-march=armv8.2-a+dotprod"])]
    return [(os.path.join(SRC, name), flags) for name, flags in isas]


class BuildExt(build_ext):
    """Compiles the per-ISA files with their own flags, then links them into the extension."""

    def build_extension(self, ext):
        if getattr(ext, "isa_sources", None):
            ext.extra_objects = list(ext.extra_objects or [])
            for src, flags in ext.isa_sources:
                ext.extra_objects += self.compiler.compile(
                    [src], output_dir=self.build_temp, include_dirs=[SRC], extra_postargs=BASE_FLAGS + flags,
                    depends=ext.depends, debug=self.debug)
        super().build_extension(ext)


cpu_ext = Extension(
    "onebit.kernels.cpu._ext",
    sources=[os.path.join(SRC, f) for f in ("module.c", "pool.c", "dispatch.c", "common.c")],
    depends=[os.path.join(SRC, f) for f in ("ob.h", "kernels_impl.h", "prims_avx2.h")] + [s for s, _ in isa_sources()],
    include_dirs=[SRC],
    extra_compile_args=BASE_FLAGS,
    extra_link_args=["-pthread"],
)
cpu_ext.isa_sources = isa_sources()

setup(
    ext_modules=[cpu_ext],
    cmdclass={"build_ext": BuildExt},
    package_data={"onebit.kernels.cpu": ["src/*.c", "src/*.h"], "onebit": ["data/*.gguf"]},
)
