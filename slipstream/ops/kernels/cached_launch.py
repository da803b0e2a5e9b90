"""Eager launches of compiled Triton kernels without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds and specializes every argument, builds a cache key, reads
its settings and looks up the device and stream on every call: on the H200 hosts we measured,
one such launch cost about twice ATen's whole dropout forward (``benchmarks/host_overhead.py``).
A :class:`CachedLauncher` lets Triton do that once per *signature* of the arguments, keeps the
compiled kernel Triton returns, and hands later launches with the same signature straight to that
kernel's launcher.

The signature is at least as fine as Triton's specialization key (checked against triton 3.6 and
3.9): each tensor's dtype and whether its address is 16-byte aligned; for each int whether it is
1, whether it is divisible by 16 and which integer width holds it; the type of bools, floats and
None; every keyword (constexprs and launch options such as ``num_warps``) with its value; the
current CUDA device. Two launches with one signature are therefore served by the same compiled
kernel Triton itself would pick. Arguments of any other type, constexpr parameters passed by
position (the signature does not hold their values), and launches while a Triton launch hook is
installed (profilers) always take Triton's own path. Triton settings changed while the process runs
(its debug or instrumentation modes) are not part of the signature: set
``slipstream.config.eager_launch = "triton"`` to have them apply.

Imported only when a kernel is about to run (see ``slipstream.ops._backend``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable

import torch
from triton import knobs

__all__ = ["CachedLauncher", "cached_launcher"]

_INT32_MIN, _INT32_END, _INT64_END = -(2**31), 2**31, 2**63


class _Uncacheable(Exception):
    """An argument whose type the signature does not cover."""


def _argument_signature(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    kind = type(value)
    if kind is int:
        return value == 1, value % 16 == 0, _INT32_MIN <= value < _INT32_END, value < _INT64_END
    if kind is bool or kind is float or value is None:
        return kind
    raise _Uncacheable(kind)


def _current_stream(device: int) -> int:
    # What Triton's own launch path asks torch for (no Stream object is built).
    return torch._C._cuda_getCurrentRawStream(device)


class CachedLauncher:
    """``launcher[grid](*args, **meta)``: launches ``kernel`` as ``kernel[grid]`` would, faster after the first time.

    ``grid`` is a tuple of one to three ints. ``stream_of`` (the raw CUDA stream of a device
    index) is for tests.

    Example (on a CUDA machine; any ``@triton.jit`` kernel):
        >>> launch = cached_launcher(my_kernel)  # doctest: +SKIP
        >>> launch[(n_programs,)](x, y, n, BLOCK=1024)  # doctest: +SKIP
    """

    def __init__(self, kernel: Any, stream_of: Callable[[int], int] = _current_stream) -> None:
        self._kernel = kernel
        self._stream_of = stream_of
        self._compiled: dict[Hashable, tuple] = {}
        # Parameters Triton fills from keywords or defaults, by position after the positional ones.
        self._defaults = {name: p.default for name, p in kernel.signature.parameters.items()}
        self._first_constexpr = min(kernel.constexprs, default=len(kernel.arg_names))

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        device = torch.cuda.current_device()
        try:
            if len(args) > self._first_constexpr:  # a constexpr's value would not be in the signature
                raise _Uncacheable("constexpr passed by position")
            key = (device, tuple(map(_argument_signature, args)), tuple(meta.items()))
        except _Uncacheable:
            self._kernel[grid](*args, **meta)
            return
        entry = self._compiled.get(key)
        if entry is None or knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls:
            compiled = self._kernel[grid](*args, **meta)
            if entry is None:
                self._compiled[key] = self._entry(compiled, len(args), meta)
            return
        run, function, packed_metadata, rest = entry
        grid_x, grid_y, grid_z = (tuple(grid) + (1, 1))[:3]
        # No launch metadata and no hooks: what Triton passes them is only for installed hooks.
        run(grid_x, grid_y, grid_z, self._stream_of(device), function, packed_metadata, None, None, None,
            *args, *rest)

    def _entry(self, compiled: Any, n_positional: int, meta: dict) -> tuple:
        if hasattr(compiled, "result"):  # triton 3.9 may hand back a future of the compiled kernel
            compiled = compiled.result()
        compiled._init_handles()  # loads the kernel if Triton has not (a no-op after a launch)
        names = self._kernel.arg_names[n_positional:]
        rest = tuple(meta[name] if name in meta else self._defaults[name] for name in names)
        return compiled.run, compiled.function, compiled.packed_metadata, rest

    def cached_signatures(self) -> int:
        """How many argument signatures have a compiled kernel kept (for tests and diagnostics)."""
        return len(self._compiled)


_launchers: dict[Any, CachedLauncher] = {}


def cached_launcher(kernel: Any) -> CachedLauncher:
    """The one :class:`CachedLauncher` of ``kernel`` (a ``@triton.jit`` function), made on first use.

    Example (on a CUDA machine):
        >>> cached_launcher(my_kernel)[(4,)](x, y, n, BLOCK=256)  # doctest: +SKIP
    """
    launcher = _launchers.get(kernel)
    if launcher is None:
        launcher = _launchers[kernel] = CachedLauncher(kernel)
    return launcher
