"""Seeded dropout: the keep mask is a pure function of (seed, element index), never stored.

Forward and backward regenerate the mask from the seed, so the only state saved for backward is
one int64 seed (eager dropout keeps a one-byte mask per element). Backward is the same op applied
to the incoming gradient: ``dx = where(keep, dy / (1 - p), 0)``.

The stream: columns are grouped by 8; group ``g`` of a row draws one Philox-4x32-10 call
``philox(key, lo32(g), hi32(g), 0, 0)`` (:mod:`slipstream.ops.philox`), whose four words split into
eight 16-bit numbers ``u`` (column ``8*g + j`` takes word ``j % 4``, its low half for ``j < 4``, its
high half otherwise), and an element is kept when ``u >= round(p * 2**16)``. Eight decisions per
Philox call keep the kernel memory-bound in bf16; the price is that the drop probability is
``p`` rounded to a multiple of ``2**-16`` (the scale stays exactly ``1 / (1 - p)``).

* :func:`seeded_dropout` keys the whole tensor with one seed and numbers its elements in row-major
  order (one row of ``x.numel()`` columns); a non-contiguous ``x`` is copied once.
* :func:`seeded_dropout_rows` keys each row of a 2-D tensor with its own seed and numbers columns
  within the row; any strides work without a copy (a transposed view gives the values of its
  contiguous copy).

The decision is made in integers, so the Triton kernel and the PyTorch fallback (the ``*_reference``
functions, used on CPU, for float64 and by the tests) give the same mask for the same seed.

Under ``torch.compile``, by default (:data:`slipstream.config.compiled_dropout` ``= "inductor"``),
they trace as PyTorch ops that Inductor fuses into its own kernels, with a hashed random stream
instead of Philox (:mod:`slipstream.ops.hashed_dropout`), so compiled masks differ from eager ones.
With the setting ``"kernel"`` both are ``triton_op`` s (``slipstream::seeded_dropout`` and
``slipstream::seeded_dropout_rows``) whose backward is the same op on the gradient: the compiler
traces their bodies (allocation and one ``wrap_triton`` launch, see :mod:`slipstream.ops._triton_op`)
and launches the kernel from its own code. Traced code cannot read a seed tensor's value on the
host, so the compiled whole-tensor op hands the kernel its seed in device memory (an 8-byte copy
when the seed is on the CPU); eager mode passes it as a kernel argument. Compiled CPU code under
Triton's interpreter runs the fallback (interpreted kernels cannot be traced).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from slipstream import config
from slipstream.ops._backend import use_triton
from slipstream.ops._triton_op import body_uses_triton, register_triton_op
from slipstream.ops.hashed_dropout import hashed_dropout
from slipstream.ops.philox import philox, split_u64

__all__ = [
    "seeded_dropout",
    "seeded_dropout_rows",
    "seeded_dropout_reference",
    "seeded_dropout_rows_reference",
    "keep_mask",
    "keep_threshold",
]

_LANES = 8  # columns per Philox call
_KEEP_LEVELS = 1 << 16  # each decision compares a 16-bit number
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def keep_threshold(p: float) -> int:
    """The integer threshold a 16-bit random number must reach to keep its element.

    Example:
        >>> keep_threshold(0.5), keep_threshold(0.0), keep_threshold(1.0)
        (32768, 0, 65536)
    """
    return round(p * _KEEP_LEVELS)


def _scale(p: float) -> float:
    return 0.0 if p == 1 else 1.0 / (1.0 - p)


def keep_mask(seeds: Tensor, p: float, n_cols: int, start: int = 0) -> Tensor:
    """Boolean keep mask of columns ``start .. n_cols - 1`` for rows keyed by ``seeds``, in PyTorch.

    ``seeds`` is an int64 tensor with one seed per row (a 0-d tensor is one row); the result has
    shape ``(rows, n_cols - start)`` on ``seeds``' device.

    Example:
        >>> m = keep_mask(torch.tensor([7, 8]), 0.25, 10)
        >>> m.shape, m.dtype
        (torch.Size([2, 10]), torch.bool)
    """
    if not isinstance(seeds, Tensor) or seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {_describe(seeds)}")
    first = start // _LANES
    groups = torch.arange(first, -(-n_cols // _LANES), device=seeds.device)
    lo, hi = split_u64(groups)
    words = torch.stack(philox(seeds.reshape(-1, 1), lo, hi), dim=-1)  # (rows, groups, 4)
    numbers = torch.cat([words & 0xFFFF, words >> 16], dim=-1).flatten(1)  # 8 per group
    return numbers[:, start - first * _LANES : n_cols - first * _LANES] >= keep_threshold(p)


def _apply_mask(x: Tensor, mask: Tensor, p: float, out: Optional[Tensor] = None) -> Tensor:
    return torch.where(mask, x * _scale(p), torch.zeros((), dtype=x.dtype, device=x.device), out=out)


def seeded_dropout_reference(x: Tensor, p: float, seed: Union[int, Tensor]) -> Tensor:
    """PyTorch version of :func:`seeded_dropout` (same mask, computed in ``x``'s dtype).

    Example:
        >>> x = torch.randn(3, 5, dtype=torch.float64)
        >>> torch.equal(seeded_dropout_reference(x, 0.5, 1), seeded_dropout_reference(x, 0.5, 1))
        True
    """
    key = _on_device(_seed_tensor(_checked_seed(seed)), x.device)
    return _apply_mask(x, keep_mask(key, p, x.numel()).view(x.shape), p)


def seeded_dropout_rows_reference(x: Tensor, p: float, seeds: Tensor) -> Tensor:
    """PyTorch version of :func:`seeded_dropout_rows` (same mask, computed in ``x``'s dtype).

    Example:
        >>> x = torch.randn(4, 6, dtype=torch.float64)
        >>> seeded_dropout_rows_reference(x, 0.5, torch.arange(4)).shape
        torch.Size([4, 6])
    """
    return _apply_mask(x, keep_mask(_on_device(seeds, x.device), p, x.shape[1]), p)


def _on_device(seeds: Tensor, device: torch.device) -> Tensor:
    """``seeds`` on ``device`` without stalling the host.

    A blocking CPU-to-GPU copy synchronizes the stream: under ``torch.compile`` that was one sync
    per dropout call (the compiled graph computes each seed on the CPU), 25 per GPT-2 step. The
    non-blocking copy of a few bytes from pageable memory is staged by the driver before it returns.
    """
    return seeds.to(device, non_blocking=True)


def _kernels_apply(x: Tensor, traceable: bool) -> bool:
    # float64 takes the PyTorch path: Triton passes the Python-float scale as fp32, so float64 would be
    # scaled by a rounded 1 / (1 - p).
    return x.dtype != torch.float64 and (body_uses_triton(x) if traceable else use_triton(x))


def _launch(x: Tensor, out: Tensor, p: float, key: Union[int, Tensor], traceable: bool, one_row: bool) -> None:
    """Launch the kernel keyed by ``key``: an int or 0-d tensor for every row, or one seed per row (1-D)."""
    from slipstream.ops.kernels.dropout import launch_seeded_dropout

    seed, seeds = 0, None
    if isinstance(key, int):
        seed = key
    elif key.dim() == 1:
        seeds = key
    elif traceable:  # traced code cannot read the seed on the host: the kernel reads it from memory
        seeds = _on_device(key, x.device).expand(1 if one_row else x.shape[0])
    else:
        seed = int(key)
    launch_seeded_dropout(x, out, keep_threshold(p), _scale(p), seed, seeds, traceable=traceable, one_row=one_row)


def _dropout_2d(x: Tensor, p: float, key: Union[int, Tensor], traceable: bool = False) -> Tensor:
    """Dropout of a 2-D ``x`` keyed by ``key``: one int64 seed per row (1-D) or one for all rows.

    ``traceable``: called from a ``triton_op`` body, whose kernel launch tracing must capture.
    """
    out = torch.empty_like(x)
    if _kernels_apply(x, traceable):
        _launch(x, out, p, key, traceable, one_row=False)
        return out
    return _apply_mask(x, keep_mask(_on_device(_seed_tensor(key), x.device), p, x.shape[1]), p, out=out)


def _whole_tensor_dropout(x: Tensor, p: float, seed: Union[int, Tensor], traceable: bool = False) -> Tensor:
    """Dropout of ``x`` keyed by one seed, its elements numbered in row-major order."""
    x = x.contiguous()
    if _kernels_apply(x, traceable):
        out = torch.empty_like(x)
        _launch(x, out, p, seed, traceable, one_row=True)  # read as one row, with no view op per call
        return out
    return _apply_mask(x, keep_mask(_on_device(_seed_tensor(seed), x.device), p, x.numel()).view(x.shape), p)


def _seeded_dropout_op_body(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _whole_tensor_dropout(x, p, seed, traceable=True)


def _seeded_dropout_rows_op_body(x: Tensor, p: float, seeds: Tensor) -> Tensor:
    return _dropout_2d(x, p, seeds, traceable=True)


# Their fake (shape-only) implementations are the bodies themselves, run on fake tensors.
_seeded_dropout_op = register_triton_op("slipstream::seeded_dropout", _seeded_dropout_op_body)
_seeded_dropout_rows_op = register_triton_op("slipstream::seeded_dropout_rows", _seeded_dropout_rows_op_body)


def _register_dropout_autograd(op: torch.library.CustomOpDef) -> None:
    """Backward of dropout is dropout of the gradient with the same seed(s): save only those."""

    def setup_context(ctx, inputs, output) -> None:
        _, ctx.p, key = inputs
        ctx.save_for_backward(key)

    def backward(ctx, grad: Tensor):
        (key,) = ctx.saved_tensors
        return op(grad, ctx.p, key), None, None

    op.register_autograd(backward, setup_context=setup_context)


_register_dropout_autograd(_seeded_dropout_op)
_register_dropout_autograd(_seeded_dropout_rows_op)


class _EagerDropout(torch.autograd.Function):
    """Eager mode's path: the ops' functions with direct launches, minus the dispatcher's round trips.

    The dispatcher costs more host time per call than the kernel takes on the GPU at common sizes
    (the same finding as for LayerNorm); under ``torch.compile`` the triton_ops are used instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float, key: Union[int, Tensor], body, on_backward) -> Tensor:
        ctx.p, ctx.key, ctx.body, ctx.on_backward = p, key, body, on_backward
        return body(x, p, key)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.on_backward is not None:
            ctx.on_backward()
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable in turn
            return _EagerDropout.apply(grad, ctx.p, ctx.key, ctx.body, None), None, None, None, None
        return ctx.body(grad, ctx.p, ctx.key), None, None, None, None


def _dispatch(
    op: torch.library.CustomOpDef, body, x: Tensor, p: float, key: Union[int, Tensor],
    on_backward: Optional[Callable[[], None]] = None,
) -> Tensor:
    if torch.compiler.is_compiling():
        path = config.compiled_dropout
        if path == "inductor":  # PyTorch ops Inductor fuses, in another random stream
            # On x's device even when 0-d: a CPU seed entered Inductor's kernel as a scalar argument, and
            # CUDA graph trees (mode="reduce-overhead") refused the graph's outputs as not in their pool.
            seeds = _on_device(_seed_tensor(key), x.device)
            return hashed_dropout(x.contiguous() if seeds.dim() == 0 else x, seeds, keep_threshold(p), _scale(p))
        if path != "kernel":
            raise ValueError(f"slipstream.config.compiled_dropout must be 'kernel' or 'inductor', got {path!r}")
        return op(x, p, _seed_tensor(key))  # traced: the triton_op, so the graph has no breaks
    return _EagerDropout.apply(x, p, key, body, on_backward)  # an int seed stays an int: no tensor per call


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _check_x_and_p(x: object, p: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe(x)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1], got {_describe(p)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")


def _checked_seed(seed: object) -> Union[int, Tensor]:
    """``seed`` if it is an int in the int64 range or a one-element int64 tensor (then 0-d), else an error."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be an int or a one-element int64 tensor, got {_describe(seed)}")
        return seed if seed.dim() == 0 else seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element int64 tensor, got {_describe(seed)}")
    if not _INT64_MIN <= seed <= _INT64_MAX:
        raise ValueError(f"seed must be in [-2**63, 2**63 - 1], got {seed}")
    return seed


def _seed_tensor(seed: Union[int, Tensor]) -> Tensor:
    """A checked seed as a 0-d int64 tensor (a per-row seed tensor passes through)."""
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)


def seeded_dropout(
    x: Tensor, p: float, seed: Union[int, Tensor], *, on_backward: Optional[Callable[[], None]] = None
) -> Tensor:
    """Dropout whose keep mask is a pure function of ``seed`` and the element's row-major index.

    Kept elements are scaled by ``1 / (1 - p)``; ``p=0`` returns a copy of ``x``, ``p=1`` zeros. The
    same seed gives the same mask on every call and every device; backward regenerates it, so
    nothing but the seed is saved. (Compiled, by default ``slipstream.config.compiled_dropout =
    "inductor"``, the mask comes from another stream, :mod:`slipstream.ops.hashed_dropout`.)
    ``seed`` is an int in the int64 range or a one-element int64 tensor (a CUDA seed tensor is read
    back to the host, a synchronization). The result is
    contiguous; a non-contiguous ``x`` is copied once. ``on_backward`` (eager mode) is called with
    no arguments when backward reaches the result, before the gradient is computed (SeededDropout's
    seed stream uses it to tell recomputation from a new step, without a tensor hook per call).

    Example:
        >>> x = torch.randn(4, 8)
        >>> y = seeded_dropout(x, 0.5, seed=1234)
        >>> torch.equal(y, seeded_dropout(x, 0.5, seed=1234))
        True
        >>> bool(((y == 0) | torch.isclose(y, 2 * x)).all())
        True
    """
    _check_x_and_p(x, p)
    if on_backward is not None and not callable(on_backward):
        raise TypeError(f"on_backward must be None or a callable, got {_describe(on_backward)}")
    return _dispatch(_seeded_dropout_op, _whole_tensor_dropout, x, float(p), _checked_seed(seed), on_backward)


def seeded_dropout_rows(x: Tensor, p: float, seeds: Tensor) -> Tensor:
    """Dropout of a 2-D ``x`` with one int64 seed per row; the mask of row ``i`` depends on ``seeds[i]``.

    Columns are numbered within each row, so rows with equal seeds get equal masks and a row's mask
    does not depend on the other rows. Any strides work (no copy); the result has ``x``'s layout
    when ``x`` is dense, and the values of the contiguous case always. Compiled, by default
    ``slipstream.config.compiled_dropout = "inductor"``, the masks come from another stream
    (:mod:`slipstream.ops.hashed_dropout`).

    Example:
        >>> x = torch.randn(3, 10)
        >>> y = seeded_dropout_rows(x, 0.5, torch.tensor([1, 2, 1]))
        >>> torch.equal(y[0] == 0, y[2] == 0)
        True
        >>> torch.equal(seeded_dropout_rows(x.t().contiguous().t(), 0.5, torch.tensor([1, 2, 1])), y)
        True
    """
    _check_x_and_p(x, p)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, columns), got shape {tuple(x.shape)}")
    if not isinstance(seeds, Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError(f"seeds must be a 1-D int64 tensor, got {_describe(seeds)}")
    if seeds.shape[0] != x.shape[0]:
        raise ValueError(f"seeds must have one seed per row of x ({x.shape[0]}), got {seeds.shape[0]}")
    if seeds.device != x.device:
        raise ValueError(f"seeds must be on x's device ({x.device}), got {seeds.device}")
    return _dispatch(_seeded_dropout_rows_op, _dropout_2d, x, float(p), seeds)
