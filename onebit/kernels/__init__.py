"""Backend registry: a backend is imported only when chosen; ``auto`` picks the fastest available."""

from __future__ import annotations

import importlib

from ..errors import UnsupportedError

# name -> (module, class); tried in this order by "auto"
_REGISTRY: dict[str, tuple[str, str]] = {
    "cuda": ("onebit.kernels.triton", "CudaBackend"),
    "cpu": ("onebit.kernels.cpu", "CpuBackend"),
    "numpy": ("onebit.kernels.numpy_ref", "NumpyBackend"),
}


def available_backends() -> list[str]:
    """Names whose module imports and whose hardware is present, fastest first."""
    names = []
    for name in _REGISTRY:
        try:
            cls = _load_class(name)
        except (ImportError, UnsupportedError):
            continue
        if getattr(cls, "is_available", lambda: True)():
            names.append(name)
    return names


def get_backend(name: str = "auto", **options):
    """Instantiate a backend by name ("auto", "cuda", "cpu", "numpy")."""
    if name == "auto":
        name = available_backends()[0]
    if name not in _REGISTRY:
        raise UnsupportedError(f"unknown backend {name!r} (choose from auto, {', '.join(_REGISTRY)})")
    try:
        cls = _load_class(name)
    except ImportError as e:
        raise UnsupportedError(f"backend {name!r} is not available here: {e}") from None
    if not getattr(cls, "is_available", lambda: True)():
        raise UnsupportedError(f"backend {name!r} is not available on this machine")
    return cls(**options)


def backend_options(name: str = "auto") -> frozenset[str]:
    """The keyword options the backend ``name`` ("auto": the one ``get_backend`` would pick) accepts, or an
    empty set when it cannot be imported (``get_backend`` then raises its own clear error)."""
    import inspect

    try:
        cls = _load_class(available_backends()[0] if name == "auto" else name)
    except (ImportError, KeyError, IndexError, UnsupportedError):
        return frozenset()
    return frozenset(inspect.signature(cls).parameters)


def _load_class(name: str):
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)
