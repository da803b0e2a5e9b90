"""Ops the compiler can see into: ``torch.library.triton_op`` bodies and their kernel launches.

Under ``torch.compile`` a ``custom_op`` is opaque: every call goes from the compiled code through
the dispatcher into our Python launcher, which costs more host time than small kernels take on
the GPU. A ``triton_op``'s body is traced instead: its allocations and its
``wrap_triton(kernel)[grid](...)`` launches become graph nodes, and Inductor launches the kernels
from its generated wrapper, with no Python of ours per call (and CUDA graphs can capture them).

A body therefore holds only shape-dependent Python, torch allocations and wrapped launches; the
launchers in :mod:`slipstream.ops.kernels` take ``traceable=True`` from a body and launch
through :func:`launcher`. Eager mode keeps calling them with ``traceable=False`` (direct launches
through :mod:`slipstream.ops.kernels.cached_launch`, no higher-order-op dispatch).
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

from slipstream import config
from slipstream.ops._backend import interpreting, use_triton

__all__ = ["register_triton_op", "launcher", "launch_keyed", "body_uses_triton"]

Kernel = TypeVar("Kernel")


def register_triton_op(name: str, body: Callable) -> torch.library.CustomOpDef:
    """``body`` registered as the op ``name`` (it mutates none of its inputs).

    A ``triton_op`` (its fake implementation is ``body`` itself, run on fake tensors); on torch
    older than 2.6, which has no ``triton_op``, an opaque ``custom_op`` with the same body.

    Example:
        >>> def _twice(x: torch.Tensor) -> torch.Tensor:
        ...     return x * 2
        >>> op = register_triton_op("slipstream::doc_twice", _twice)
        >>> torch.ops.slipstream.doc_twice(torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    if hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(name, body, mutates_args=())
    op = torch.library.custom_op(name, body, mutates_args=())
    op.register_fake(body)
    return op


def _as_is(kernel: Kernel) -> Kernel:
    return kernel


def _cached(kernel: Kernel) -> Kernel:
    from slipstream.ops.kernels.cached_launch import cached_launcher

    return cached_launcher(kernel)


def launcher(traceable: bool) -> Callable[[Kernel], Kernel]:
    """What a launcher indexes with ``[grid]``: ``wrap_triton(kernel)`` in a traced body, else a fast eager launcher.

    ``wrap_triton`` returns the kernel itself when a ``triton_op`` runs on real tensors, so a body
    always asks for it. Eager paths get the kernel's
    :class:`~slipstream.ops.kernels.cached_launch.CachedLauncher` (no higher-order-op dispatch, and
    no Triton argument binding after the first launch), or under Triton's interpreter the kernel
    itself.

    Example (under ``TRITON_INTERPRET=1``, as in the tests):
        >>> launcher(False)(print) is print
        True
    """
    if interpreting():  # interpreted kernels cannot be wrapped, and compile nothing to cache
        return _as_is
    if traceable and hasattr(torch.library, "wrap_triton"):
        return torch.library.wrap_triton
    mode = config.eager_launch
    if mode == "cached":
        return _cached
    if mode == "triton":
        return _as_is
    raise ValueError(f"slipstream.config.eager_launch must be 'cached' or 'triton', got {mode!r}")


def launch_keyed(kernel: Kernel, grid: tuple[int, ...], key: Hashable, args: tuple, meta: dict,
                 traceable: bool = False) -> None:
    """``kernel[grid](*args, **meta)``, everything but its tensors memoized by the caller under ``key``.

    Eager launches with cached launches on go through
    :meth:`~slipstream.ops.kernels.cached_launch.CachedLauncher.launch_keyed` (only the tensors are
    looked at per launch); ``traceable`` ones (a ``triton_op`` body) through ``wrap_triton``, where
    ``key`` is unused; anything else is a plain launch.

    Example (under ``TRITON_INTERPRET=1``, as in the tests, a plain call of the kernel):
        >>> launch_keyed({(1,): print}, (1,), "doc", ("a", 1), {"sep": "-"})
        a-1
    """
    launch = launcher(traceable)(kernel)
    keyed = None if traceable else getattr(launch, "launch_keyed", None)
    if keyed is not None:
        keyed(grid, key, args, meta)
    else:
        launch[grid](*args, **meta)


def body_uses_triton(x: torch.Tensor) -> bool:
    """:func:`~slipstream.ops._backend.use_triton` for a ``triton_op`` body.

    The same answer, except on fake tensors under Triton's interpreter: ``wrap_triton`` cannot
    capture an interpreted kernel, so tracing takes the PyTorch fallback there (compiled CPU code
    then runs the fallback; eager mode still runs the interpreted kernels).

    Example:
        >>> body_uses_triton(torch.ones(2)) == use_triton(torch.ones(2))
        True
    """
    if not use_triton(x):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not (interpreting() and is_fake(x))
