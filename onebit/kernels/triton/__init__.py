"""The `cuda` backend: Triton kernels on a GPU, the decode step captured as CUDA graphs (see backend.py).

This module imports neither torch nor triton: ``CudaBackend.is_available()`` first looks for a GPU device node
and the packages, so ``1bit run`` on a machine without a GPU never pays for importing torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def _gpu_device_nodes() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


class CudaBackend:
    """Factory for ``TritonCudaBackend`` (imported on first use).

    ``lm_head``: "f16" (exact) or "int8" (per-row); ``kv_dtype``: "f32" (default, exact) or "f16" (half the KV
    bytes; ``onebit.load``'s "auto" picks it for int8-activation models); ``graphs``: capture decode steps as
    CUDA graphs (default True); ``device``: a torch device ("cuda" by default; "cpu" only under Triton's
    interpreter, for tests). ``threads`` is accepted and ignored (a CPU option).
    """

    name = "cuda"

    def __new__(cls, lm_head: str = "f16", kv_dtype: str = "f32", graphs: bool = True, device: str | None = None,
                threads: int | None = None):
        from .backend import TritonCudaBackend

        return TritonCudaBackend(lm_head=lm_head, kv_dtype=kv_dtype, graphs=graphs, device=device)

    @staticmethod
    def is_available() -> bool:
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
            return False
        if not _gpu_device_nodes():
            return False
        import torch

        return torch.cuda.is_available()
