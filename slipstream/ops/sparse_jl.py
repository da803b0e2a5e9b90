"""Seeded sparse Johnson-Lindenstrauss transform: ``y = x @ S`` with ``S`` regenerated, never stored.

``S`` has shape ``(in_features, out_features)`` = ``(d, k)`` and entries
``sqrt(s / k) * e`` where ``e`` is ``+1`` or ``-1`` with probability ``1 / (2 s)`` each and ``0``
otherwise (Achlioptas / Li et al. sparse projections, ``s`` = ``sparsity``), so that
``E ||x @ S||^2 = ||x||^2``. Every entry is a pure function of ``(seed, i, j)``: the Triton kernel
builds each tile of ``S`` in registers from Philox words and multiplies it on the tensor cores, and
the PyTorch fallback (:func:`sparse_jl_matrix`) materializes the same matrix bit for bit.

The bits (``docs/sparse_jl.md`` says why this layout). Write a row as
``i = 64 I + 16 c + 8 e + 2 t + b`` and a column as ``j = 256 J + 128 r + 16 w + 8 h + g``:

* The 16 entries of column ``j`` with rows ``64 I + 2 t + {16 c + 8 e + b}`` share one 32-bit word
  ``Z`` of 16 (keep, sign) bit pairs: row part ``(c, e, b)`` reads pair ``u = 2 c + e + 8 b``, bit
  ``2 u`` keeps the entry and bit ``2 u + 1`` is its sign.
* Philox calls ``philox(seed, lo32(I), hi32(I), C, STREAM | 32 w + 4 g + t)`` give the words.
  ``s = 2`` (keep and sign are fair coins): ``Z`` is a Philox word; call ``C = J`` gives the words
  of ``(r, h) = (0, 0), (0, 1), (1, 0), (1, 1)``. ``s = 8``: call ``C = 2 J + r`` gives words
  ``A, B`` for ``h = 0`` then for ``h = 1`` and ``Z = (A & 0xAAAAAAAA) | (A & B & (B >> 1) & 0x55555555)``
  (keep = AND of three fair bits). Every Philox word is used.

Those are exactly the elements one thread holds in Hopper's wgmma register operand for ``S.T``
(bf16: two adjacent rows per register), so each thread expands the words it draws itself. Shifting
a bit pair into bits 14-15 of a 16-bit lane gives the bf16/fp16 bit pattern of ``0`` or ``+-2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slipstream.ops._backend import use_triton
from slipstream.ops.philox import philox, split_u64

__all__ = [
    "sparse_jl",
    "sparse_jl_transpose",
    "sparse_jl_matrix",
    "sparse_jl_reference",
    "SPARSITIES",
    "KERNEL_DTYPES",
]

#: Allowed ``sparsity`` values ``s``: entries are nonzero with probability ``1 / s``. Two and eight
#: are the powers of two whose ``log2(s) + 1`` bits per entry fill whole Philox calls.
SPARSITIES = (2, 8)
#: Dtypes the Triton kernel takes (fp32 multiplies in tf32); float64 always runs the PyTorch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Philox counter word c3 of this op (its low byte holds ``32 w + 4 g + t``): keeps its stream apart
#: from other ops keyed by the same seed.
PHILOX_STREAM = 0x4A4C5300

_INT64_MAX = 2**63 - 1
_EVEN_BITS = 0x55555555
_ODD_BITS = 0xAAAAAAAA
_ROWS_PER_CHUNK = 1024  # rows of S the fallback builds at a time (bounds its int64 scratch)


def _scale(out_features: int, sparsity: int) -> float:
    return math.sqrt(sparsity / out_features)


def _entry_codes(seed: int, rows: Tensor, out_features: int, sparsity: int) -> Tensor:
    """Entries ``e`` in {-1, 0, 1} (int8) of ``S``'s rows ``rows``, before scaling."""
    i = rows[:, None]
    j = torch.arange(out_features, device=rows.device)[None, :]
    lo, hi = split_u64(i // 64)
    stream = PHILOX_STREAM | ((j % 128) // 16) << 5 | (j % 8) << 2 | (i % 8) // 2
    h = (j % 16) // 8
    if sparsity == 2:
        z = torch.stack(philox(seed, lo, hi, j // 256, stream), dim=-1)
        z = z.gather(-1, (2 * ((j % 256) // 128) + h).expand(len(rows), -1)[..., None])[..., 0]
    else:
        words = torch.stack(philox(seed, lo, hi, j // 128, stream), dim=-1)
        a = words.gather(-1, (2 * h).expand(len(rows), -1)[..., None])[..., 0]
        b = words.gather(-1, (2 * h + 1).expand(len(rows), -1)[..., None])[..., 0]
        z = (a & _ODD_BITS) | (a & b & (b >> 1) & _EVEN_BITS)
    pair = 2 * ((i % 64) // 16) + (i % 16) // 8 + 8 * (i % 2)
    bits = (z >> (2 * pair)) & 3  # bit 0 keep, bit 1 sign
    return ((bits & 1) * (1 - (bits >> 1) * 2)).to(torch.int8)


def sparse_jl_matrix(
    in_features: int,
    out_features: int,
    seed: int,
    sparsity: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The projection ``S`` (``in_features x out_features``) that :func:`sparse_jl` uses, materialized.

    Entries are ``0`` or ``+-sqrt(sparsity / out_features)``; same seed, same matrix, on any device.

    Example:
        >>> S = sparse_jl_matrix(64, 16, seed=7)
        >>> S.shape, [round(v, 4) for v in S.unique().tolist()]  # +-sqrt(2 / 16)
        (torch.Size([64, 16]), [-0.3536, 0.0, 0.3536])
    """
    _check_projection(in_features, out_features, seed, sparsity, features_name="in_features")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    out = torch.empty(in_features, out_features, dtype=dtype, device=device)
    scale = _scale(out_features, sparsity)
    for start in range(0, in_features, _ROWS_PER_CHUNK):
        rows = torch.arange(start, min(start + _ROWS_PER_CHUNK, in_features), device=out.device)
        out[start : start + len(rows)] = _entry_codes(seed, rows, out_features, sparsity).to(dtype) * scale
    return out


def sparse_jl_reference(x: Tensor, out_features: int, seed: int, sparsity: int = 2) -> Tensor:
    """``x @ S`` with ``S`` from :func:`sparse_jl_matrix`, in PyTorch (float32, or float64 for float64).

    The CPU fallback of :func:`sparse_jl`, and the tests' reference.

    Example:
        >>> x = torch.randn(3, 64, dtype=torch.float64)
        >>> torch.allclose(sparse_jl_reference(x, 16, 7), x @ sparse_jl_matrix(64, 16, 7, dtype=torch.float64))
        True
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = sparse_jl_matrix(x.shape[-1], out_features, seed, sparsity, dtype=work, device=x.device)
    return (x.to(work) @ s).to(x.dtype)


def _transpose_reference(dy: Tensor, in_features: int, seed: int, sparsity: int) -> Tensor:
    """``dy @ S.T`` in PyTorch: the fallback of :func:`sparse_jl_transpose`."""
    work = torch.float64 if dy.dtype == torch.float64 else torch.float32
    s = sparse_jl_matrix(in_features, dy.shape[-1], seed, sparsity, dtype=work, device=dy.device)
    return (dy.to(work) @ s.T).to(dy.dtype)


def _runs_kernel(x: Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES and use_triton(x)


def _project(x: Tensor, out_features: int, seed: int, sparsity: int) -> Tensor:
    """``x @ S`` for 2-D ``x``: the body of ``slipstream::sparse_jl``."""
    if _runs_kernel(x):
        from slipstream.ops.kernels.sparse_jl import launch_projection

        return launch_projection(x, out_features, seed, sparsity, _scale(out_features, sparsity), transposed=False)
    return sparse_jl_reference(x, out_features, seed, sparsity)


def _project_transposed(dy: Tensor, in_features: int, seed: int, sparsity: int) -> Tensor:
    """``dy @ S.T`` for 2-D ``dy``: the body of ``slipstream::sparse_jl_transpose``."""
    if _runs_kernel(dy):
        from slipstream.ops.kernels.sparse_jl import launch_projection

        scale = _scale(dy.shape[1], sparsity)
        return launch_projection(dy, in_features, seed, sparsity, scale, transposed=True)
    return _transpose_reference(dy, in_features, seed, sparsity)


_sparse_jl_op = torch.library.custom_op("slipstream::sparse_jl", _project, mutates_args=())
_sparse_jl_transpose_op = torch.library.custom_op("slipstream::sparse_jl_transpose", _project_transposed, mutates_args=())


@_sparse_jl_op.register_fake
def _sparse_jl_fake(x: Tensor, out_features: int, seed: int, sparsity: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


@_sparse_jl_transpose_op.register_fake
def _sparse_jl_transpose_fake(dy: Tensor, in_features: int, seed: int, sparsity: int) -> Tensor:
    return dy.new_empty(dy.shape[0], in_features)


# x -> x @ S and dy -> dy @ S.T are adjoint linear maps: each one's backward is the other, with S
# regenerated from the seed (nothing is saved). S itself is not a parameter and gets no gradient.
def _sparse_jl_backward(ctx, grad: Tensor):
    return _sparse_jl_transpose_op(grad, ctx.features, ctx.seed, ctx.sparsity), None, None, None


def _sparse_jl_transpose_backward(ctx, grad: Tensor):
    return _sparse_jl_op(grad, ctx.features, ctx.seed, ctx.sparsity), None, None, None


def _save_projection(ctx, inputs, output) -> None:
    x, _, ctx.seed, ctx.sparsity = inputs
    ctx.features = x.shape[1]  # the other side's width: d for forward, k for the transpose


_sparse_jl_op.register_autograd(_sparse_jl_backward, setup_context=_save_projection)
_sparse_jl_transpose_op.register_autograd(_sparse_jl_transpose_backward, setup_context=_save_projection)


class _EagerProjection(torch.autograd.Function):
    """Eager mode's path: the custom ops' bodies minus the dispatcher's Python round trips.

    On the H100 machine's host the custom op and Triton's launcher took about 0.1 ms per call, more
    than the kernel takes at small sizes (the same finding as for LayerNorm and dropout); under
    ``torch.compile`` the custom ops are used instead. ``body`` is one direction, ``adjoint`` the other.
    """

    @staticmethod
    def forward(ctx, x, width, seed, sparsity, body, adjoint):
        ctx.features, ctx.seed, ctx.sparsity, ctx.body, ctx.adjoint = x.shape[1], seed, sparsity, body, adjoint
        return body(x, width, seed, sparsity)

    @staticmethod
    def backward(ctx, grad):
        dx = _EagerProjection.apply(grad, ctx.features, ctx.seed, ctx.sparsity, ctx.adjoint, ctx.body)
        return dx, None, None, None, None, None


def _dispatch(transposed: bool, x: Tensor, width: int, seed: int, sparsity: int) -> Tensor:
    """One direction on 2-D ``x``: the custom op when traced (no graph breaks), else the eager Function."""
    if torch.compiler.is_compiling():
        op = _sparse_jl_transpose_op if transposed else _sparse_jl_op
        return op(x, width, seed, sparsity)
    body, adjoint = (_project_transposed, _project) if transposed else (_project, _project_transposed)
    return _EagerProjection.apply(x, width, seed, sparsity, body, adjoint)


def _check_projection(features: object, out_features: object, seed: object, sparsity: object, features_name: str) -> None:
    for name, value in ((features_name, features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63 - 1], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= _INT64_MAX:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if isinstance(sparsity, bool) or sparsity not in SPARSITIES:
        raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")


def _check_input(x: object, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        detail = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {detail}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (..., features), got a 0-d tensor")


def _apply_2d(transposed: bool, x: Tensor, out_width: int, seed: int, sparsity: int) -> Tensor:
    """Run one direction on ``x`` viewed as (rows, features) and restore the leading dimensions."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:  # empty, but still a function of x for autograd (as nn.Linear's output is)
        return x.narrow(-1, 0, 1).expand(*lead, out_width) * 0
    return _dispatch(transposed, rows, out_width, seed, sparsity).reshape(*lead, out_width)


def sparse_jl(x: Tensor, out_features: int, seed: int, sparsity: int = 2) -> Tensor:
    """Random projection ``x @ S`` of the last dimension of ``x`` (``d``) to ``out_features`` (``k``).

    ``S`` (``d x k``) is a sparse random sign matrix (entries nonzero with probability
    ``1 / sparsity``, scaled so that ``E ||y||^2 = ||x||^2``) regenerated from ``seed`` on every
    call, forward and backward: the projection's whole state is the seed. On CUDA a Triton kernel
    builds ``S`` tile by tile in registers and multiplies on the tensor cores (float32 in tf32); on
    CPU (and for float64) the PyTorch fallback materializes ``S`` with :func:`sparse_jl_matrix`.
    ``x`` of any shape ``(..., d)`` works; a non-contiguous ``x`` may be copied once.

    Example:
        >>> x = torch.randn(5, 256)
        >>> y = sparse_jl(x, 64, seed=3)
        >>> y.shape, torch.equal(y, sparse_jl(x, 64, seed=3))
        (torch.Size([5, 64]), True)
    """
    _check_input(x, "x")
    _check_projection(x.shape[-1], out_features, seed, sparsity, features_name="x.shape[-1]")
    return _apply_2d(False, x, out_features, seed, sparsity)


def sparse_jl_transpose(dy: Tensor, in_features: int, seed: int, sparsity: int = 2) -> Tensor:
    """``dy @ S.T`` for the ``S`` of ``sparse_jl(x, dy.shape[-1], seed, sparsity)`` with ``in_features`` = ``d``.

    The adjoint of :func:`sparse_jl` (its backward); also a seeded random "lift" from ``k`` to ``d``.

    Example:
        >>> x, dy = torch.randn(2, 40, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
        >>> lhs = (sparse_jl(x, 8, seed=1) * dy).sum()
        >>> bool(torch.isclose(lhs, (x * sparse_jl_transpose(dy, 40, seed=1)).sum()))
        True
    """
    _check_input(dy, "dy")
    _check_projection(in_features, dy.shape[-1], seed, sparsity, features_name="in_features")
    return _apply_2d(True, dy, in_features, seed, sparsity)
