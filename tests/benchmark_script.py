"""A script of benchmarks/ loaded as a module, for the tests of its pieces (the benchmarks are no package)."""

from __future__ import annotations

import importlib.util
import os


def benchmark_script(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
