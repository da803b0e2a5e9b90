"""Triton kernels for LayerNorm over the rows of an ``[M, N]`` matrix, and their launchers.

Imported lazily by :mod:`slipstream.ops.layer_norm`, only when a kernel is about to run. Every
kernel reads inputs in their own dtype, does all math in fp32 and writes outputs in the dtype of
the buffer it is given, so mixed precision (fp32 residual stream in, bf16 out) needs no cast kernel.

Forward. Rows up to :data:`MAX_REGISTER_ROW` wide are held in registers, ``block_m`` rows per
program: one read of x, one write of y. Their statistics are exact two-pass sums over the
registers (mean first, then the sum of squared deviations), so there is no cancellation and no
extra memory traffic. Wider rows take a looped path: the first loop merges per-chunk (mean, M2)
pairs with Chan et al.'s pairwise update, the second reads the row again (from L2, where the
first loop just put it) and writes y.

Backward, with ``xhat = (x - mean) * rstd`` and ``g = w * dy``::

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)),  dW = sum_rows(dy * xhat),  dB = sum_rows(dy)

Rows up to :data:`MAX_BACKWARD_REGISTER_ROW` wide: a persistent grid; each program walks its rows,
writes dx and keeps fp32 dW/dB partial sums in registers, stored once per program. Wider rows
cannot keep a row of accumulators in registers, so a row-sums kernel first computes the two
per-row means, then a column-tiled kernel writes dx and keeps partial sums for its columns over
its share of the rows. Either way a small kernel then adds the partial sums in a fixed order:
the result is deterministic, with no atomics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "MAX_REGISTER_ROW",
    "MAX_BACKWARD_REGISTER_ROW",
    "Tiling",
    "forward_tiling",
    "backward_tiling",
    "forward",
    "backward",
]

#: Widest row (a power of two) the forward holds in registers; wider rows take the looped path.
MAX_REGISTER_ROW = 16384
#: Widest row (a power of two) the backward holds in registers with its dW/dB accumulators.
MAX_BACKWARD_REGISTER_ROW = 8192


@dataclass(frozen=True)
class Tiling:
    """Launch shape of one kernel: a ``block_m`` x ``block_n`` tile, ``num_warps`` warps per program.

    ``programs_per_sm``: the backward launches about this many programs per multiprocessor, each
    walking its share of the rows (the forward launches one program per tile).
    """

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 1


def forward_tiling(n: int, element_size: int) -> Tiling:
    """Default forward tiling for rows of ``n`` elements of ``element_size`` bytes.

    Example:
        >>> forward_tiling(1024, 2)
        Tiling(block_m=4, block_n=1024, num_warps=4, programs_per_sm=1)
    """
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_REGISTER_ROW:
        return Tiling(block_m=1, block_n=4096, num_warps=8)
    # About 16 bytes per thread per row (one vector load), several rows per program for short rows.
    num_warps = max(1, min(16, block_n * element_size // (16 * 32 * 2)))
    block_m = max(1, min(16, 4096 // block_n))
    return Tiling(block_m=block_m, block_n=block_n, num_warps=num_warps)


def backward_tiling(n: int, element_size: int) -> Tiling:
    """Default backward tiling for rows of ``n`` elements of ``element_size`` bytes.

    Example:
        >>> backward_tiling(1024, 2)
        Tiling(block_m=2, block_n=1024, num_warps=4, programs_per_sm=2)
    """
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_BACKWARD_REGISTER_ROW:
        return Tiling(block_m=16, block_n=256, num_warps=8, programs_per_sm=4)
    num_warps = max(1, min(16, block_n * element_size // (16 * 32 * 2)))
    block_m = max(1, min(8, 2048 // block_n))
    return Tiling(block_m=block_m, block_n=block_n, num_warps=num_warps, programs_per_sm=2)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # Triton's CPU interpreter: a few programs, so tests walk several rows per program


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _scale_shift(y, W, B, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y * w + b`` along the last axis, for whichever of w and b exist."""
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    return y


# M (the row count) is not specialized on: batch shapes vary, and each value would compile anew.
@triton.jit(do_not_specialize=["M"])
def _forward_rows_kernel(
    X, Y, W, B, Mean, Rstd, M, N, stride_x, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)
    y = _scale_shift(centered * rstd[:, None], W, B, cols[None, :], col_ok[None, :], HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _forward_looped_kernel(
    X, Y, W, B, Mean, Rstd, N, stride_x, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * N
    offsets = tl.arange(0, BLOCK_N)
    mean = 0.0
    m2 = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + offsets
        ok = cols < N
        # evict_last: the second loop re-reads this chunk, and should find it in L2.
        x = tl.load(x_row + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        n_seen = start * 1.0
        n_chunk = tl.minimum(N - start, BLOCK_N) * 1.0
        chunk_mean = tl.sum(x, axis=0) / n_chunk
        deviation = tl.where(ok, x - chunk_mean, 0.0)
        delta = chunk_mean - mean
        n_total = n_seen + n_chunk
        mean += delta * (n_chunk / n_total)
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (n_seen * n_chunk / n_total)
    rstd = tl.rsqrt(m2 / N + eps)
    for start in range(0, N, BLOCK_N):
        cols = start + offsets
        ok = cols < N
        x = tl.load(x_row + cols, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = _scale_shift((x - mean) * rstd, W, B, cols, ok, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


def forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    out_dtype: torch.dtype,
    tiling: Optional[Tiling] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of each row of ``x`` (``[M, N]``, unit column stride): ``(y, mean, rstd)``.

    ``y`` is contiguous in ``out_dtype``; ``mean`` and ``rstd`` are fp32 of shape ``[M]``.
    ``tiling`` overrides :func:`forward_tiling` (benchmarks use it to tune).

    Example:
        >>> x = torch.randn(6, 100, device='cuda', dtype=torch.bfloat16)
        >>> y, mean, rstd = forward(x, None, None, 1e-5, torch.bfloat16)
    """
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    tiling = tiling or forward_tiling(n, x.element_size())
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, num_warps=tiling.num_warps)
    w = x if weight is None else weight  # a placeholder pointer when absent: never read
    b = x if bias is None else bias
    if tiling.block_n >= n:
        grid = (triton.cdiv(m, tiling.block_m),)
        _forward_rows_kernel[grid](
            x, y, w, b, mean, rstd, m, n, x.stride(0), eps,
            BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, **flags,
        )
    else:
        _forward_looped_kernel[(m,)](x, y, w, b, mean, rstd, n, x.stride(0), eps, BLOCK_N=tiling.block_n, **flags)
    return y, mean, rstd


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _load_tile(ptr, rows64, stride, cols, mask):
    return tl.load(ptr + rows64 * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _backward_rows_kernel(
    DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, M, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first_row in range(program * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = _load_tile(X, rows64, stride_x, cols[None, :], mask)
        dy = _load_tile(DY, rows64, stride_dy, cols[None, :], mask)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        # Masked rows and columns have dy = 0, so they add nothing to the sums below.
        xhat = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        mean_gx = tl.sum(g * xhat, axis=1) / N
        mean_g = tl.sum(g, axis=1) / N
        dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_WEIGHT:
        tl.store(DW_partial + program * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_partial + program * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _backward_row_means_kernel(
    DY, X, W, Mean, Rstd, MeanGX, MeanG, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    offsets = tl.arange(0, BLOCK_N)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offsets
        ok = cols < N
        # evict_last: the column kernel that runs next walks the rows bottom-up, re-reading the last
        # rows read here while they are still in L2.
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if HAS_WEIGHT:
            dy = dy * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        acc_gx += dy * (x - mean) * rstd
        acc_g += dy
    tl.store(MeanGX + row, tl.sum(acc_gx, axis=0) / N)
    tl.store(MeanG + row, tl.sum(acc_g, axis=0) / N)


@triton.jit(do_not_specialize=["M"])
def _backward_columns_kernel(
    DY, X, W, Mean, Rstd, MeanGX, MeanG, DX, DW_partial, DB_partial, M, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    group = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_blocks = tl.cdiv(M, BLOCK_M)
    for i in range(group, row_blocks, tl.num_programs(1)):
        rows = (row_blocks - 1 - i) * BLOCK_M + tl.arange(0, BLOCK_M)  # bottom-up: see the row-means kernel
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = _load_tile(X, rows64, stride_x, cols[None, :], mask)
        dy = _load_tile(DY, rows64, stride_dy, cols[None, :], mask)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        mean_gx = tl.load(MeanGX + rows, mask=row_ok, other=0.0)
        mean_g = tl.load(MeanG + rows, mask=row_ok, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_WEIGHT:
        tl.store(DW_partial + group * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_partial + group * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _add_partials(Partial, Out, cols, n_partials, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[cols] = sum over the rows of Partial[n_partials, N], always in the same order."""
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(Partial + parts[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    DW_partial, DB_partial, DW, DB, n_partials, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_WEIGHT:
        _add_partials(DW_partial, DW, cols, n_partials, N, BLOCK_P, BLOCK_N)
    if HAS_BIAS:
        _add_partials(DB_partial, DB, cols, n_partials, N, BLOCK_P, BLOCK_N)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    bias_dtype: Optional[torch.dtype],
    tiling: Optional[Tiling] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`forward`: ``(dx, dw, db)`` for ``dy`` and ``x`` of shape ``[M, N]``.

    ``dy`` and ``x`` need unit column stride; ``dx`` is contiguous in ``x``'s dtype, ``dw`` in
    ``weight``'s dtype (None without weight) and ``db`` in ``bias_dtype`` (None when that is None).
    ``tiling`` overrides :func:`backward_tiling` (benchmarks use it to tune).

    Example:
        >>> x = torch.randn(6, 100, device='cuda')
        >>> w = torch.randn(100, device='cuda')
        >>> y, mean, rstd = forward(x, w, None, 1e-5, x.dtype)
        >>> dx, dw, db = backward(torch.randn_like(y), x, w, mean, rstd, None)
    """
    m, n = x.shape
    device = x.device
    tiling = tiling or backward_tiling(n, x.element_size())
    dx = torch.empty((m, n), dtype=x.dtype, device=device)
    has_weight, has_bias = weight is not None, bias_dtype is not None
    flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
                 num_warps=tiling.num_warps)
    w = x if weight is None else weight  # a placeholder pointer when absent: never read
    if tiling.block_n >= n:
        n_partials = min(_multiprocessors(device) * tiling.programs_per_sm, triton.cdiv(m, tiling.block_m))
        partials = torch.empty((2, n_partials, n), dtype=torch.float32, device=device)
        _backward_rows_kernel[(n_partials,)](
            dy, x, w, mean, rstd, dx, partials[0], partials[1], m, n, dy.stride(0), x.stride(0), **flags
        )
    else:
        col_blocks = triton.cdiv(n, tiling.block_n)
        row_groups = triton.cdiv(_multiprocessors(device) * tiling.programs_per_sm, col_blocks)
        n_partials = min(row_groups, triton.cdiv(m, tiling.block_m))
        mean_gx = torch.empty(m, dtype=torch.float32, device=device)
        mean_g = torch.empty_like(mean_gx)
        _backward_row_means_kernel[(m,)](
            dy, x, w, mean, rstd, mean_gx, mean_g, n, dy.stride(0), x.stride(0),
            HAS_WEIGHT=has_weight, BLOCK_N=4096, num_warps=8,
        )
        partials = torch.empty((2, n_partials, n), dtype=torch.float32, device=device)
        _backward_columns_kernel[(col_blocks, n_partials)](
            dy, x, w, mean, rstd, mean_gx, mean_g, dx, partials[0], partials[1], m, n, dy.stride(0), x.stride(0),
            **flags,
        )
    dw = torch.empty(n, dtype=weight.dtype, device=device) if has_weight else None
    db = torch.empty(n, dtype=bias_dtype, device=device) if has_bias else None
    if has_weight or has_bias:
        block_n = 64
        _sum_partials_kernel[(triton.cdiv(n, block_n),)](
            partials[0], partials[1], x if dw is None else dw, x if db is None else db, n_partials, n,
            HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_P=32, BLOCK_N=block_n, num_warps=4,
        )
    return dx, dw, db
