"""A counter-based seed generator for modules that draw one seed per call (SeededDropout).

Seed number ``i`` of the stream keyed by ``key`` is ``stream_seed(key, i)`` (SplitMix64 of
``key + (i + 1) * golden_ratio``), so the whole state is two integers ``(key, calls)``, the owner's
run state (:mod:`slipstream.nn.run_state`). Why not a ``torch.Generator``: drawing from one is a
graph break under ``torch.compile``, and a counter can be rewound, which activation checkpointing
needs.

Checkpointing: ``torch.utils.checkpoint`` re-runs a forward during backward and needs the same masks
back, with or without ``preserve_rng_state``. A call made while autograd runs a backward pass
(``torch._C._current_graph_task_id() != -1``, the test FSDP2 and ``ModuleTracker`` use for the same
purpose) is a recomputation: it replays the seeds drawn since the previous backward, in drawing
order. Draws made with gradients enabled and draws made without are kept apart, and a
recomputation replays those its kind of checkpointing made: reentrant checkpointing
(``use_reentrant=True``, recomputing from a ``CheckpointFunctionBackward`` node) runs its forward
without gradients, so it replays the draws made without; any other recomputation replays the draws
made with gradients (or, if there were none, those without). So a ``no_grad`` call in training mode
between backward passes (a metrics pass) does not shift a non-reentrant replay, and a call with
gradients outside a reentrant region does not shift its replay. That is exact when one checkpointed
region holds the owner's calls of its kind (called once or several times in it); a ``no_grad`` call
beside a reentrant region, or a call with gradients beside a non-reentrant one, in the same phase
would shift the replay. A warning says when one backward recomputes the owner in several regions,
whose replay order would not match. A phase keeps at most :data:`MAX_PHASE_RUNS` runs of consecutive
draws of each kind (a module that no backward reaches, called alternately with and without
gradients, would otherwise grow them without bound). Under ``torch.compile`` the seed is a
graph value computed from the stream's state tensor by :func:`stream_seed_of_state` (plain integer
tensor ops, no Python of ours per call), and the compiler recomputes it itself; the state
advances by binding a new tensor, a side effect dynamo refuses inside a checkpointed region unless
``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True``, so without that
setting each such region is a graph break (and runs eagerly, with correct masks).
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = ["SeedStream", "stream_seed", "stream_seed_of_state", "check_int64"]

_MASK64 = (1 << 64) - 1
_ONE_CALL = torch.tensor([0, 1], dtype=torch.int64)
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's multipliers
_MASK32 = 0xFFFFFFFF
#: Runs of consecutive draws a phase keeps of each kind (with, without gradients); older runs are dropped.
MAX_PHASE_RUNS = 256
_REENTRANT_CHECKPOINT_NODE = "CheckpointFunctionBackward"  # torch.utils.checkpoint's use_reentrant=True


def stream_seed(key: int, index: int) -> int:
    """Seed number ``index`` of the stream keyed by ``key``: a 63-bit non-negative int.

    Example:
        >>> stream_seed(0, 0) == stream_seed(0, 0) != stream_seed(0, 1)
        True
    """
    z = (key + (index + 1) * _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _C1) & _MASK64
    z = ((z ^ (z >> 27)) * _C2) & _MASK64
    return (z ^ (z >> 31)) >> 1


# 64-bit words as (hi, lo) pairs of int64 tensors in [0, 2**32): every product stays below 2**63, so
# the arithmetic is exact in int64 (no signed overflow, which compiled C++ would leave undefined).
def _mul_low32(a: int, b: Tensor) -> Tensor:
    """The low 32 bits of constant ``a`` (< 2**32) times words ``b``."""
    return ((((a * (b >> 16)) & 0xFFFF) << 16) + a * (b & 0xFFFF)) & _MASK32


def _mul_u64(hi: Tensor, lo: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo) * c`` modulo 2**64, for a 64-bit constant ``c``."""
    c_hi, c_lo = c >> 32, c & _MASK32
    lo_hi16, lo_lo16 = lo >> 16, lo & 0xFFFF
    p_hi, p_lo = c_lo * lo_hi16, c_lo * lo_lo16  # each < 2**48
    carry = (p_hi + (p_lo >> 16)) >> 16  # high word of c_lo * lo
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    high = (carry + _mul_low32(c_lo, hi) + _mul_low32(c_hi, lo)) & _MASK32
    return high, low


def _xor_shift(hi: Tensor, lo: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``z ^ (z >> k)`` for a 64-bit ``z`` and 0 < k < 32."""
    return hi ^ (hi >> k), lo ^ (((lo >> k) | (hi << (32 - k))) & _MASK32)


def stream_seed_of_state(state: Tensor) -> Tensor:
    """:func:`stream_seed` of ``(state[0], state[1])`` in integer tensor ops: a 0-d int64 tensor.

    The same value as ``stream_seed(*state.tolist())``, computed without reading the tensor on the
    host, so ``torch.compile`` traces it into the graph.

    Example:
        >>> int(stream_seed_of_state(torch.tensor([-5, 7]))) == stream_seed(-5, 7)
        True
    """
    key, index = state[0], state[1]
    # (index + 1) * golden ratio, then + key, all modulo 2**64
    step = index + 1
    hi, lo = _mul_u64((step >> 32) & _MASK32, step & _MASK32, _GOLDEN_GAMMA)
    lo = lo + (key & _MASK32)
    hi = (hi + ((key >> 32) & _MASK32) + (lo >> 32)) & _MASK32
    lo = lo & _MASK32
    hi, lo = _mul_u64(*_xor_shift(hi, lo, 30), _C1)
    hi, lo = _mul_u64(*_xor_shift(hi, lo, 27), _C2)
    hi, lo = _xor_shift(hi, lo, 31)
    return (hi << 31) | (lo >> 1)  # the top 63 bits: non-negative, below 2**63


def check_int64(name: str, value: object) -> int:
    """``value`` if it is an int in the int64 range; else TypeError/ValueError naming ``name``.

    Example:
        >>> check_int64("seed", 7)
        7
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must be in [-2**63, 2**63 - 1], got {value}")
    return value


class SeedStream:
    """One seed per call from a ``(key, calls)`` counter; replays them when checkpointing recomputes.

    Example:
        >>> stream = SeedStream(key=42)
        >>> a, b = int(stream.next()), int(stream.next())
        >>> a != b, stream.state_dict()
        (True, {'key': 42, 'calls': 2})
    """

    def __init__(self, key: int) -> None:
        # CPU int64 [key, calls]: a tensor so compiled graphs advance it without recompiling. Every
        # advance binds a new tensor (never in place): a compiled backward may still read the old one.
        self.state = torch.tensor([check_int64("key", key), 0], dtype=torch.int64)
        self._reset_replay()

    def _reset_replay(self) -> None:
        self._start_phase()
        self._replay_task = -1  # graph task replaying the phase, the node that triggered it, position
        self._replay_node: Any = None  # left out of pickles (see __getstate__): autograd nodes cannot be pickled
        self._replay_cursor = 0

    def _start_phase(self) -> None:
        # Seed indices drawn since the last backward, as [start, stop) runs, with gradients enabled / disabled.
        self._phase_draws: dict[bool, deque[list[int]]] = {
            True: deque(maxlen=MAX_PHASE_RUNS), False: deque(maxlen=MAX_PHASE_RUNS)}
        self._backward_seen = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and deep-copied) as the stream's position; a copy starts with no phase to replay."""
        return {"state": self.state.clone()}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.state = saved["state"]
        self._reset_replay()

    def next(self) -> Union[int, Tensor]:
        """The seed for this call (replayed during recomputation).

        An int; a 0-d int64 CPU tensor when compiling (traced, so the graph computes it).
        """
        if torch.compiler.is_compiling():
            # Pure op plus a rebound state: compiled checkpointing recomputes the seed from the old state.
            seed = stream_seed_of_state(self.state)
            self.state = self.state + _ONE_CALL
            return seed
        task = torch._C._current_graph_task_id()
        if task != -1:
            return self._replay(task)
        if self._backward_seen:
            self._start_phase()
        key, calls = self.state.tolist()
        runs = self._phase_draws[torch.is_grad_enabled()]
        if runs and runs[-1][1] == calls:
            runs[-1][1] = calls + 1
        else:
            runs.append([calls, calls + 1])
        return self._draw(key, calls)

    def _draw(self, key: int, calls: int) -> int:
        self.state = self.state + _ONE_CALL  # a new tensor; an add costs less host time than torch.tensor
        return stream_seed(key, calls)

    def _replayed_index(self, position: int, reentrant: bool) -> Optional[int]:
        """Index of the ``position``-th seed a recomputation replays, or None past the phase's draws."""
        with_grad, without_grad = self._phase_draws[True], self._phase_draws[False]
        for start, stop in without_grad if reentrant else with_grad or without_grad:
            if position < stop - start:
                return start + position
            position -= stop - start
        return None

    def backward_reached(self) -> None:
        """Call when backward reaches a call's result (eager mode): the next call starts a new phase."""
        self._backward_seen = True

    def _replay(self, task: int) -> int:
        self._backward_seen = True
        node = torch._C._current_autograd_node()
        if task != self._replay_task:
            self._replay_task, self._replay_node, self._replay_cursor = task, node, 0
        elif node is not self._replay_node:
            self._replay_node = node
            warnings.warn(
                "a module drawing seeds from a SeedStream (e.g. SeededDropout) was recomputed by more "
                "than one checkpointed region in one backward pass; its masks are replayed in forward "
                "order, which matches only when a single region calls it. Give each region its own module.",
                RuntimeWarning,
                stacklevel=3,
            )
        key, calls = self.state.tolist()
        reentrant = node is not None and node.name() == _REENTRANT_CHECKPOINT_NODE
        index = self._replayed_index(self._replay_cursor, reentrant)
        self._replay_cursor += 1
        if index is None:
            warnings.warn(
                "a SeedStream was called during backward more often than during the forward pass it "
                "would recompute; drawing a fresh seed",
                RuntimeWarning,
                stacklevel=3,
            )
            return self._draw(key, calls)
        return stream_seed(key, index)

    def state_dict(self) -> dict[str, int]:
        """``{'key': ..., 'calls': ...}``: everything needed to continue the stream."""
        key, calls = self.state.tolist()
        return {"key": key, "calls": calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or set(state) != {"key", "calls"}:
            raise ValueError(f"expected a dict with keys 'key' and 'calls', got {state!r}")
        calls = check_int64("calls", state["calls"])
        if calls < 0:
            raise ValueError(f"calls must be >= 0, got {calls}")
        self.state = torch.tensor([check_int64("key", state["key"]), calls], dtype=torch.int64)
        self._reset_replay()
