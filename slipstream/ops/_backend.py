"""Which backend an op runs on: a Triton kernel or the pure-PyTorch fallback.

Triton is imported lazily (only when a kernel is about to run), so ``import slipstream`` works on
machines without Triton. Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
is set: that is how CI checks the kernels on a machine with no GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreting", "use_triton"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should run its Triton kernel rather than the PyTorch fallback."""
    if not triton_available():
        return False
    if x.device.type == "cuda":
        return not interpreting()
    return x.device.type == "cpu" and interpreting()
