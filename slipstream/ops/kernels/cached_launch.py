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
from typing import Any, Callable, Hashable, Optional

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


def _keyed_signature(device: int, key: Hashable, args: tuple, positions: tuple[int, ...]) -> Hashable:
    """A keyed launch's signature: the caller's key, and the dtype and alignment of each tensor."""
    return device, key, tuple([(args[i].dtype, args[i].data_ptr() % 16 == 0) for i in positions])


def _hooked() -> bool:
    """Whether a Triton launch hook (a profiler) is installed: such launches take Triton's own path."""
    return bool(knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls)


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
        # launch_keyed: the caller's key -> positions of the tensor arguments; (device, key, tensors) -> entry
        self._tensor_positions: dict[Hashable, tuple[int, ...]] = {}
        self._keyed: dict[Hashable, tuple] = {}
        # Parameters Triton fills from keywords or defaults, by position after the positional ones.
        self._defaults = {name: p.default for name, p in kernel.signature.parameters.items()}
        self._first_constexpr = min(kernel.constexprs, default=len(kernel.arg_names))

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        self._launch_entry(grid, args, meta)

    def _launch_entry(self, grid: tuple[int, ...], args: tuple, meta: dict) -> Optional[tuple]:
        """Launch; return the kept compiled kernel that serves this signature (None: not cacheable)."""
        device = torch.cuda.current_device()
        try:
            if len(args) > self._first_constexpr:  # a constexpr's value would not be in the signature
                raise _Uncacheable("constexpr passed by position")
            key = (device, tuple(map(_argument_signature, args)), tuple(meta.items()))
        except _Uncacheable:
            self._kernel[grid](*args, **meta)
            return None
        entry = self._compiled.get(key)
        if entry is None or _hooked():
            compiled = self._kernel[grid](*args, **meta)
            if entry is None:
                entry = self._compiled[key] = self._entry(compiled, len(args), meta)
            return entry
        self._run(entry, grid, device, args)
        return entry

    def _run(self, entry: tuple, grid: tuple[int, ...], device: int, args: tuple) -> None:
        run, function, packed_metadata, rest = entry
        grid_x, grid_y, grid_z = (tuple(grid) + (1, 1))[:3]
        # No launch metadata and no hooks: what Triton passes them is only for installed hooks.
        run(grid_x, grid_y, grid_z, self._stream_of(device), function, packed_metadata, None, None, None,
            *args, *rest)

    def launch_keyed(self, grid: tuple[int, ...], key: Hashable, args: tuple, meta: dict) -> None:
        """``self[grid](*args, **meta)`` for a caller that memoizes everything but the tensors under ``key``.

        Two launches may share ``key`` only when their non-tensor arguments and ``meta`` are equal (a
        launcher memoizes them per configuration and keys them by that memo's identity), except for
        arguments of parameters the kernel does not specialize on (``do_not_specialize``). Per launch
        only the tensors' dtypes and alignment are then read, not every argument's signature.

        Example (on a CUDA machine):
            >>> cached_launcher(my_kernel).launch_keyed((4,), 17, (x, y, n), {"BLOCK": 256})  # doctest: +SKIP
        """
        device = torch.cuda.current_device()
        positions = self._tensor_positions.get(key)
        if positions is not None:
            entry = self._keyed.get(_keyed_signature(device, key, args, positions))
            if entry is not None and not _hooked():
                self._run(entry, grid, device, args)
                return
        entry = self._launch_entry(grid, args, meta)
        if entry is not None:
            positions = self._tensor_positions[key] = tuple(
                i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            self._keyed[_keyed_signature(device, key, args, positions)] = entry

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


# Keyed by id: hashing a JITFunction computes its cache key, a microsecond per launch. Each launcher
# holds its kernel, so a kernel in here stays alive and no other object can take its id.
_launchers: dict[int, CachedLauncher] = {}


def cached_launcher(kernel: Any) -> CachedLauncher:
    """The one :class:`CachedLauncher` of ``kernel`` (a ``@triton.jit`` function), made on first use.

    Example (on a CUDA machine):
        >>> cached_launcher(my_kernel)[(4,)](x, y, n, BLOCK=256)  # doctest: +SKIP
    """
    launcher = _launchers.get(id(kernel))
    if launcher is None:
        launcher = _launchers[id(kernel)] = CachedLauncher(kernel)
    return launcher
