"""Scratch memory that eager kernel launches reuse, instead of allocating it on every call.

A GroupNorm launch needs fp32 scratch (tile partials, per-channel sums) and, for its fused barrier,
int32 words that are zero when it starts. Allocating them per call cost the H200 host about 6 us
per ``torch.empty`` and 8-12 us per ``torch.zeros`` (a memset launch): over the 53 norms of a
resnet50_gn step, forward and backward, several milliseconds of a step that is host-bound
(``benchmarks/host_overhead.py``, docs/benchmarks.md). Here each (device, stream, thread) keeps one
buffer of each kind and hands it out again:

* :func:`scratch` returns fp32 memory of undefined contents. Launches on one stream run in order,
  so a launch may use it freely while no tensor it returns is a view of it that outlives the next
  launch on that stream.
* :func:`barrier_words` returns two halves of an int32 buffer: words that are zero for this launch,
  and words the launch must zero for the next one. The halves swap on every call, so a launch
  never has to reset the words it counts in (which would put a reset on its barrier's critical
  path): the launch after it clears them, while using the other half. One thread's launches on one
  stream run in the order they were made, so each half is cleared by one launch and used by the
  next. A launch that takes its turn and then does not run must call
  :func:`discard_barrier_words`, or the next one would count in words nobody cleared.

While the current stream is being captured into a CUDA graph, both return fresh memory (the
barrier words zeroed by a captured memset): a graph must not share buffers with eager launches that
may run on another stream while it replays, and each replay zeroes its words again. Streams are
told apart by their handle; torch's stream pool never destroys its streams, so a handle names one
stream for the life of the process.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["scratch", "barrier_words", "discard_barrier_words"]

# (device, stream handle, thread) -> buffer. Few entries: one per stream and thread that launched.
_scratch: dict[tuple[torch.device, int, int], torch.Tensor] = {}
_barriers: dict[tuple[torch.device, int, int], "_Halves"] = {}


def _stream_key(device: torch.device) -> tuple[torch.device, int, int] | None:
    """(device, current stream handle, thread), or None while that stream is being captured.

    Per thread as well as per stream: barrier words are handed out in call order and must be used
    in that order, which holds for one thread's launches on one stream but not for two threads'.
    """
    if device.type != "cuda":
        return device, 0, threading.get_ident()  # CPU (Triton's interpreter): launches run in call order
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch._C._cuda_isCurrentStreamCapturing():
        return None
    return device, torch._C._cuda_getCurrentRawStream(index), threading.get_ident()


def _grown(capacity: int, numel: int) -> int:
    """A buffer's new size when ``numel`` does not fit its ``capacity``: geometric growth, so a slowly
    growing need reallocates rarely. The old buffer goes back to the caching allocator, which reuses
    it only for work queued after the launches that still use it on this stream."""
    return max(numel, 2 * capacity)


def scratch(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` fp32 elements of scratch on ``device``, contents undefined (module docstring).

    Example:
        >>> buf = scratch(torch.device("cpu"), 10)
        >>> buf.dtype, buf.numel() >= 10, scratch(torch.device("cpu"), 4) is buf
        (torch.float32, True, True)
    """
    key = _stream_key(device)
    if key is None:
        return torch.empty(numel, device=device, dtype=torch.float32)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < numel:
        size = numel if buffer is None else _grown(buffer.numel(), numel)
        buffer = _scratch[key] = torch.empty(size, device=device, dtype=torch.float32)
    return buffer


class _Halves:
    """A zeroed int32 buffer as two halves (views made once), and which one the next launch counts in."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.halves = torch.zeros(2 * capacity, device=device, dtype=torch.int32).split(capacity)
        self.capacity = capacity
        self.current = 0


def barrier_words(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Barrier words for one launch: ``(words, next_words)``, each at least ``numel`` long.

    ``words`` are zero; the launch must zero all of ``next_words`` (its every element) for the next
    caller on this stream, and may leave ``words`` as it likes (module docstring).

    Example:
        >>> words, next_words = barrier_words(torch.device("cpu"), 5)
        >>> int(words.abs().sum()), barrier_words(torch.device("cpu"), 5)[0] is next_words
        (0, True)
    """
    key = _stream_key(device)
    if key is None:
        return torch.zeros(2 * numel, device=device, dtype=torch.int32).split(numel)
    buffer = _barriers.get(key)
    if buffer is None or buffer.capacity < numel:
        capacity = numel if buffer is None else _grown(buffer.capacity, numel)
        buffer = _barriers[key] = _Halves(device, capacity)
    words, next_words = buffer.halves[buffer.current], buffer.halves[1 - buffer.current]
    buffer.current = 1 - buffer.current
    return words, next_words


def discard_barrier_words(device: torch.device) -> None:
    """Forget the current stream's barrier words: for a launch that took its turn and then did not run.

    The next launch would count in words that launch was to zero; it gets fresh zeroed ones instead.

    Example:
        >>> words, _ = barrier_words(torch.device("cpu"), 4)
        >>> discard_barrier_words(torch.device("cpu"))
        >>> barrier_words(torch.device("cpu"), 4)[0] is words
        False
    """
    key = _stream_key(device)
    if key is not None:
        _barriers.pop(key, None)
