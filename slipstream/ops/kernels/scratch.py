"""Scratch memory that eager kernel launches reuse, instead of allocating it on every call.

A GroupNorm launch needs fp32 scratch (tile partials, per-channel sums) and, for its fused barrier,
int32 words that are zero when it starts. Allocating them per call cost the H200 host about 6 us
per ``torch.empty`` and 8-12 us per ``torch.zeros`` (a memset launch): over the 53 norms of a
resnet50_gn step, forward and backward, several milliseconds of a step that is host-bound
(``benchmarks/host_overhead.py``, docs/benchmarks.md). Here each (device, stream) keeps one buffer
of each kind and hands it out again:

* :func:`scratch` returns fp32 memory of undefined contents. Launches on one stream run in order,
  so a launch may use it freely while no tensor it returns is a view of it that outlives the next
  launch on that stream.
* :func:`barrier_words` returns int32 words that are zero whenever no launch is running on the
  stream. Every kernel that uses them must leave them zero when it ends (the GroupNorm kernels'
  barriers reset their counters and flags on the way out).

While the current stream is being captured into a CUDA graph, both return fresh memory (the
barrier words zeroed by a captured memset): a graph must not share buffers with eager launches that
may run on another stream while it replays. Streams are told apart by their handle; torch's stream
pool never destroys its streams, so a handle names one stream for the life of the process.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["scratch", "barrier_words"]

# (device, stream handle) -> buffer. Few entries: one per stream that ever ran a launch.
_scratch: dict[tuple[torch.device, int], torch.Tensor] = {}
_barriers: dict[tuple[torch.device, int], torch.Tensor] = {}


def _stream_key(device: torch.device) -> tuple[torch.device, int] | None:
    """(device, current stream handle), or None while that stream is being captured."""
    if device.type != "cuda":
        return device, 0  # CPU (Triton's interpreter): launches run one after another
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch._C._cuda_isCurrentStreamCapturing():
        return None
    return device, torch._C._cuda_getCurrentRawStream(index)


def _reused(buffers: dict, device: torch.device, numel: int, dtype: torch.dtype,
            allocate: Callable[..., torch.Tensor]) -> torch.Tensor:
    key = _stream_key(device)
    if key is None:
        return allocate(numel, device=device, dtype=dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # Grow geometrically; the old buffer goes back to the caching allocator, which reuses it only
        # for work queued after the launches that still use it on this stream.
        size = numel if buffer is None else max(numel, 2 * buffer.numel())
        buffer = buffers[key] = allocate(size, device=device, dtype=dtype)
    return buffer


def scratch(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` fp32 elements of scratch on ``device``, contents undefined (module docstring).

    Example:
        >>> buf = scratch(torch.device("cpu"), 10)
        >>> buf.dtype, buf.numel() >= 10, scratch(torch.device("cpu"), 4) is buf
        (torch.float32, True, True)
    """
    return _reused(_scratch, device, numel, torch.float32, torch.empty)


def barrier_words(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` int32 words on ``device``, zero; the caller's kernels must leave them zero.

    Example:
        >>> words = barrier_words(torch.device("cpu"), 5)
        >>> words.dtype, int(words.abs().sum())
        (torch.int32, 0)
    """
    return _reused(_barriers, device, numel, torch.int32, torch.zeros)
