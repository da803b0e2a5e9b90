"""Triton kernels for LayerNorm over the rows of an ``[M, N]`` matrix, and their launchers.

Imported lazily by :mod:`slipstream.ops.layer_norm`, only when a kernel is about to run. Every
kernel reads inputs in their own dtype, does all math in fp32 and writes outputs in the dtype of
the buffer it is given, so mixed precision (fp32 residual stream in, bf16 out) needs no cast kernel.

Forward. Rows up to :data:`MAX_REGISTER_ROW` wide are held in registers, ``block_m`` rows per
tile: one read of x, one write of y. Their statistics are exact two-pass sums over the
registers (mean first, then the sum of squared deviations), so there is no cancellation and no
extra memory traffic. Wider rows take a looped path: the first loop merges per-chunk (mean, M2)
pairs with Chan et al.'s pairwise update, the second reads the row again (from L2, where the
first loop just put it) and writes y.

Backward, with ``xhat = (x - mean) * rstd`` and ``g = w * dy``::

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)),  dW = sum_rows(dy * xhat),  dB = sum_rows(dy)

Rows up to :data:`MAX_BACKWARD_REGISTER_ROW` wide: a persistent grid; each program walks its rows,
writes dx and keeps fp32 dW/dB partial sums in registers, stored once per program. Wider rows
cannot keep a row of accumulators in registers, so a row-means kernel first computes the two
per-row means, then a column-tiled kernel writes dx and keeps partial sums for its columns over
its share of the rows. Either way one ``torch.sum`` then adds the partial sums in a fixed order
(cheaper in host time than a second Triton launch): the result is deterministic, with no atomics.

Launch shapes (:class:`Tiling`: tile size, warps, persistent programs per multiprocessor, whether
to prefetch the next tile) come from a table measured on an H100 (:func:`default_tiling`).

The launchers :func:`forward` and :func:`backward` hold only shape-dependent Python, allocations
and launches, so the ``triton_op`` bodies that ``torch.compile`` traces call them too
(``traceable=True``: each launch goes through ``wrap_triton`` and lands in the compiled graph).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from slipstream.ops._triton_op import launch_keyed
from slipstream.ops.kernels.host_math import cdiv, launch_key, memoized_plan, next_power_of_2

__all__ = [
    "MAX_REGISTER_ROW",
    "MAX_BACKWARD_REGISTER_ROW",
    "Tiling",
    "default_tiling",
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

    ``programs_per_sm``: a kernel launches about this many programs per multiprocessor, each
    walking its share of the row blocks; 0 launches one program per row block. ``prefetch``: load
    the next row block before reducing the current one (more bytes in flight, more registers).
    """

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 0
    prefetch: bool = True


# Fastest tilings measured on an H100 (benchmarks/layer_norm.py --tune), by (row width rounded up
# to a power of two, element size); "wide" rows take the looped forward / column-tiled backward.
_FORWARD_TILINGS = {
    (1024, 2): Tiling(2, 1024, 2, 8, True),
    (4096, 2): Tiling(2, 4096, 8, 2, True),
    (8192, 2): Tiling(2, 8192, 32, 2, True),
    (16384, 2): Tiling(1, 16384, 32, 2, True),
    ("wide", 2): Tiling(1, 8192, 8),
    (1024, 4): Tiling(2, 1024, 4, 0, True),
    (4096, 4): Tiling(1, 4096, 4, 0, False),
    (8192, 4): Tiling(2, 8192, 32, 8, True),
    (16384, 4): Tiling(1, 16384, 16, 0, False),
    ("wide", 4): Tiling(1, 4096, 16),
}
_BACKWARD_TILINGS = {
    (1024, 2): Tiling(2, 1024, 4, 4, True),
    (4096, 2): Tiling(1, 4096, 8, 2, True),
    (8192, 2): Tiling(1, 8192, 16, 1, True),
    ("wide", 2): Tiling(4, 512, 4, 4, False),
    (1024, 4): Tiling(4, 1024, 8, 2, False),
    (4096, 4): Tiling(1, 4096, 8, 2, False),
    (8192, 4): Tiling(1, 8192, 16, 1, False),
    ("wide", 4): Tiling(4, 512, 4, 2, True),
}


@functools.lru_cache(maxsize=None)
def default_tiling(kernel: str, n: int, element_size: int) -> Tiling:
    """Default tiling of the ``'forward'`` or ``'backward'`` kernels for rows of ``n`` elements.

    The tuned tiling for the nearest measured width at or above ``n`` (for ``element_size``-byte
    elements), with as many elements per tile: narrower rows get proportionally more rows per
    tile, so each thread holds what it held when tuned.

    Example:
        >>> default_tiling('forward', 768, 2)
        Tiling(block_m=2, block_n=1024, num_warps=2, programs_per_sm=8, prefetch=True)
    """
    table, widest = {"forward": (_FORWARD_TILINGS, MAX_REGISTER_ROW),
                     "backward": (_BACKWARD_TILINGS, MAX_BACKWARD_REGISTER_ROW)}[kernel]
    block_n = next_power_of_2(n)
    size = 4 if element_size >= 4 else 2
    if block_n > widest:
        return table[("wide", size)]
    tuned_width = min(w for w, s in table if w != "wide" and s == size and w >= block_n)
    tuned = table[(tuned_width, size)]
    block_m = min(64, tuned.block_m * tuned.block_n // block_n)
    return dataclasses.replace(tuned, block_m=block_m, block_n=block_n)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # Triton's CPU interpreter: a few programs, so tests walk several rows per program


def _programs(tiling: Tiling, blocks: int, device: torch.device) -> int:
    """How many programs share ``blocks`` row blocks (see :class:`Tiling`)."""
    if tiling.programs_per_sm == 0:
        return blocks
    return min(blocks, _multiprocessors(device) * tiling.programs_per_sm)


# Launch plans kept per launcher: bounded, as varying batch or sequence sizes each add one.
_PLANS = 1024


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


@triton.jit
def _load_rows(ptr, rows, cols, M, N, stride):
    """A ``[rows, cols]`` tile in its stored dtype; rows past M and columns past N read nothing."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _store_rows(ptr, value, rows, cols, M, N):
    """Store a ``[rows, cols]`` tile into a contiguous ``[M, N]`` matrix, in the matrix's dtype."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


# M (the row count) is not specialized on: batch shapes vary, and each value would compile anew.
@triton.jit(do_not_specialize=["M"])
def _forward_rows_kernel(
    X, Y, W, B, Stats, M, N, stride_x, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Stats is [2, M]: the means, then the rstds (one allocation instead of two).
    # Persistent: each program walks row blocks with a stride, loading the next block before it
    # reduces the current one, so a load is always in flight while the reductions wait.
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    step = tl.num_programs(0) * BLOCK_M
    first = tl.program_id(0) * BLOCK_M
    if PREFETCH:
        x_next = _load_rows(X, first + tl.arange(0, BLOCK_M), cols, M, N, stride_x)
    for first_row in range(first, M, step):
        rows = first_row + tl.arange(0, BLOCK_M)
        if PREFETCH:
            x = x_next.to(tl.float32)
            x_next = _load_rows(X, rows + step, cols, M, N, stride_x)
        else:
            x = _load_rows(X, rows, cols, M, N, stride_x).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        centered = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)
        y = centered * rstd[:, None]
        if HAS_WEIGHT:
            y = y * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
        _store_rows(Y, y, rows, cols, M, N)
        tl.store(Stats + rows, mean, mask=rows < M)
        tl.store(Stats + M + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["M"])
def _forward_looped_kernel(
    X, Y, W, B, Stats, M, N, stride_x, eps,
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
    tl.store(Stats + row, mean)
    tl.store(Stats + M + row, rstd)


def _matrix(t: torch.Tensor) -> tuple[int, int, int]:
    """``(rows, row width, row stride)`` of ``t`` read as its rows of ``t.shape[-1]`` elements.

    ``t``'s last dimension must have unit stride and its leading dimensions must flatten to one
    row stride (true of contiguous tensors and of 2-D ones); callers take care of that.
    """
    n = t.shape[-1]
    # A contiguous tensor's rows are n apart whatever strides its size-1 dimensions report.
    return t.numel() // n, n, (n if t.is_contiguous() else t.stride(0))


class _ForwardPlan(NamedTuple):
    """One forward launch, everything but its tensors: kernel, grid, arguments, constexprs and options."""

    kernel: triton.JITFunction
    grid: tuple[int]
    scalars: tuple  # (m, n, row stride, eps): the kernel's arguments after its tensors
    meta: dict[str, Any]  # shared by every launch with this plan: only ever spread with **
    key: int  # for launch_keyed


@functools.lru_cache(maxsize=_PLANS)
def _forward_plan(
    m: int, n: int, row_stride: int, eps: float, element_size: int, has_weight: bool, has_bias: bool,
    tiling: Optional[Tiling], device: torch.device,
) -> _ForwardPlan:
    """The launch plan of :func:`forward` for ``m`` rows of ``n`` elements (``tiling`` as given to it)."""
    tiling = tiling or default_tiling("forward", n, element_size)
    flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, num_warps=tiling.num_warps)
    scalars = (m, n, row_stride, float(eps))  # equal keys for eps=1 and 1.0: one argument type
    if tiling.block_n >= n:
        grid = (_programs(tiling, cdiv(m, tiling.block_m), device),)
        meta = dict(BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, PREFETCH=tiling.prefetch, **flags)
        return _ForwardPlan(_forward_rows_kernel, grid, scalars, meta, launch_key())
    return _ForwardPlan(_forward_looped_kernel, (m,), scalars, dict(BLOCK_N=tiling.block_n, **flags), launch_key())


def forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    out_dtype: torch.dtype,
    tiling: Optional[Tiling] = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of each row of ``x`` (its last dimension): ``(y, stats)``.

    ``x`` is 2-D with unit column stride, or contiguous of any shape (read as rows; no reshape, which
    costs host time per call). ``y`` is contiguous, shaped like ``x``, in ``out_dtype``; ``stats``
    is fp32 ``[2, rows]``: the means, then the reciprocal standard deviations. ``weight``/``bias``
    are contiguous with one element per column. ``tiling`` overrides :func:`default_tiling`
    (benchmarks use it to tune). ``traceable``: launch through ``wrap_triton``, as a
    ``triton_op`` body must (see :mod:`slipstream.ops._triton_op`).

    Example:
        >>> x = torch.randn(6, 100, device='cuda', dtype=torch.bfloat16)
        >>> y, stats = forward(x, None, None, 1e-5, torch.bfloat16)
    """
    m, n, row_stride = _matrix(x)
    device = x.device
    # empty_like/new_empty: less argument parsing per call than torch.empty(shape, dtype=, device=)
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    stats = x.new_empty((2, m), dtype=torch.float32)
    plan = memoized_plan(_forward_plan, (m, n, row_stride), eps, x.element_size(), weight is not None,
                         bias is not None, tiling, device)
    w = x if weight is None else weight  # a placeholder pointer when absent: never read
    b = x if bias is None else bias
    launch_keyed(plan.kernel, plan.grid, plan.key, (x, y, w, b, stats, *plan.scalars), plan.meta, traceable)
    return y, stats


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _dx_tile(DX, x, dy, w, Stats, RowMeans, rows, cols, M, N,
             HAS_WEIGHT: tl.constexpr, ROW_MEANS_GIVEN: tl.constexpr):
    """Write dx for a tile of raw x, dy; return ``(dy * xhat, dy)`` for the dW/dB sums.

    ``Stats`` is the forward's ``[2, M]`` (means, rstds). The row means of ``g * xhat`` and ``g``
    come from ``RowMeans`` (``[2, M]``, same order) when ROW_MEANS_GIVEN (the column-tiled path),
    else from this tile, which then holds whole rows.
    """
    row_ok = rows < M
    mean = tl.load(Stats + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Stats + M + rows, mask=row_ok, other=0.0)
    dy = dy.to(tl.float32)
    # Masked rows and columns have dy = 0, so they add nothing to the sums.
    xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        g = dy * w[None, :]
    else:
        g = dy
    if ROW_MEANS_GIVEN:
        mean_gx = tl.load(RowMeans + rows, mask=row_ok, other=0.0)
        mean_g = tl.load(RowMeans + M + rows, mask=row_ok, other=0.0)
    else:
        mean_gx = tl.sum(g * xhat, axis=1) / N
        mean_g = tl.sum(g, axis=1) / N
    _store_rows(DX, (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None], rows, cols, M, N)
    return dy * xhat, dy


@triton.jit
def _backward_tiles(
    DY, X, W, Stats, RowMeans, DX, Partials, M, N, stride_dy, stride_x,
    cols, first_block, block_step, partial_row, n_partials,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_MEANS_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Walk row blocks first_block, first_block + block_step, ... from the bottom of the matrix up.

    Writes dx for each and stores this program's dW/dB partial sums (fp32) as row ``partial_row`` of
    ``Partials`` (``[k, n_partials, N]``: the dW sums first when HAS_WEIGHT, then the dB sums when
    HAS_BIAS).
    The next block's x and dy are loaded before the current one is reduced, so loads stay in
    flight. Bottom-up: on the column-tiled path the row-means kernel has just read the last rows,
    which are then still in L2.
    """
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = 1.0
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    last_block = tl.cdiv(M, BLOCK_M) - 1
    rows = (last_block - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    if PREFETCH:
        x_next = _load_rows(X, rows, cols, M, N, stride_x)
        dy_next = _load_rows(DY, rows, cols, M, N, stride_dy)
    for block in range(first_block, last_block + 1, block_step):
        rows = (last_block - block) * BLOCK_M + tl.arange(0, BLOCK_M)
        if PREFETCH:
            x, dy = x_next, dy_next
            rows_next = rows - block_step * BLOCK_M
            rows_next = tl.where(rows_next >= 0, rows_next, M)  # past the top: M, so nothing is read
            x_next = _load_rows(X, rows_next, cols, M, N, stride_x)
            dy_next = _load_rows(DY, rows_next, cols, M, N, stride_dy)
        else:
            x = _load_rows(X, rows, cols, M, N, stride_x)
            dy = _load_rows(DY, rows, cols, M, N, stride_dy)
        dw_tile, db_tile = _dx_tile(DX, x, dy, w, Stats, RowMeans, rows, cols, M, N,
                                    HAS_WEIGHT, ROW_MEANS_GIVEN)
        dw_acc += dw_tile
        db_acc += db_tile
    if HAS_WEIGHT:
        tl.store(Partials + partial_row * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        bias_part = n_partials if HAS_WEIGHT else 0
        tl.store(Partials + (bias_part + partial_row) * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["M"])
def _backward_rows_kernel(
    DY, X, W, Stats, DX, Partials, M, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    program = tl.program_id(0)
    _backward_tiles(
        DY, X, W, Stats, Stats, DX, Partials, M, N, stride_dy, stride_x,
        tl.arange(0, BLOCK_N), program, tl.num_programs(0), program, tl.num_programs(0),
        HAS_WEIGHT, HAS_BIAS, False, BLOCK_M, BLOCK_N, PREFETCH,
    )


@triton.jit(do_not_specialize=["M"])
def _backward_row_means_kernel(
    DY, X, W, Stats, RowMeans, M, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(Stats + row)
    rstd = tl.load(Stats + M + row)
    offsets = tl.arange(0, BLOCK_N)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offsets
        ok = cols < N
        # evict_last: the column kernel that runs next re-reads the last rows read here from L2.
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if HAS_WEIGHT:
            dy = dy * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        acc_gx += dy * (x - mean) * rstd
        acc_g += dy
    tl.store(RowMeans + row, tl.sum(acc_gx, axis=0) / N)
    tl.store(RowMeans + M + row, tl.sum(acc_g, axis=0) / N)


@triton.jit(do_not_specialize=["M"])
def _backward_columns_kernel(
    DY, X, W, Stats, RowMeans, DX, Partials, M, N, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    group = tl.program_id(1)
    _backward_tiles(
        DY, X, W, Stats, RowMeans, DX, Partials, M, N, stride_dy, stride_x,
        tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), group, tl.num_programs(1), group, tl.num_programs(1),
        HAS_WEIGHT, HAS_BIAS, True, BLOCK_M, BLOCK_N, PREFETCH,
    )


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _BackwardPlan(NamedTuple):
    """How :func:`backward` launches, everything but its tensors: the path, its programs' partial sums, the
    dx kernel's grid, the arguments after the tensors, constexprs and options, and the key of it all."""

    column_tiled: bool  # wide rows: a row-means kernel, then the column-tiled kernel
    n_partials: int
    grid: tuple[int, ...]
    scalars: tuple  # (m, n, dy's row stride, x's row stride), after each kernel's tensors
    meta: dict[str, Any]  # shared by every launch with this plan: only ever spread with **
    row_means_meta: dict[str, Any]  # the row-means kernel's, on the column-tiled path
    key: int  # for launch_keyed


@functools.lru_cache(maxsize=_PLANS)
def _backward_plan(
    m: int, n: int, stride_dy: int, stride_x: int, element_size: int, has_weight: bool, has_bias: bool,
    tiling: Optional[Tiling], device: torch.device,
) -> _BackwardPlan:
    """The launch plan of :func:`backward` for ``m`` rows of ``n`` elements (``tiling`` as given to it)."""
    tiling = tiling or default_tiling("backward", n, element_size)
    meta = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
                PREFETCH=tiling.prefetch, num_warps=tiling.num_warps)
    row_means_meta = dict(HAS_WEIGHT=has_weight, BLOCK_N=4096, num_warps=8)
    scalars = (m, n, stride_dy, stride_x)
    row_blocks = cdiv(m, tiling.block_m)
    if tiling.block_n >= n:
        n_partials = _programs(tiling, row_blocks, device)
        return _BackwardPlan(False, n_partials, (n_partials,), scalars, meta, row_means_meta, launch_key())
    col_blocks = cdiv(n, tiling.block_n)
    n_partials = cdiv(_programs(tiling, col_blocks * row_blocks, device), col_blocks)
    return _BackwardPlan(True, n_partials, (col_blocks, n_partials), scalars, meta, row_means_meta, launch_key())


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    bias_dtype: Optional[torch.dtype],
    tiling: Optional[Tiling] = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`forward`: ``(dx, dw, db)`` for ``dy`` and ``x`` of one shape.

    ``dy`` and ``x`` are each 2-D with unit column stride or contiguous (as in :func:`forward`;
    their row strides may differ); ``stats`` is the forward's. ``dx`` is contiguous in ``x``'s
    dtype, ``dw`` in ``weight``'s dtype (None without weight) and ``db`` in ``bias_dtype`` (None
    when that is None). ``tiling`` overrides :func:`default_tiling` (benchmarks use it to tune);
    ``traceable`` as in :func:`forward`.

    Example:
        >>> x = torch.randn(6, 100, device='cuda')
        >>> w = torch.randn(100, device='cuda')
        >>> y, stats = forward(x, w, None, 1e-5, x.dtype)
        >>> dx, dw, db = backward(torch.randn_like(y), x, w, stats, None)
    """
    m, n, stride_x = _matrix(x)
    stride_dy = _matrix(dy)[2]
    device = x.device
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    has_weight, has_bias = weight is not None, bias_dtype is not None
    plan = memoized_plan(_backward_plan, (m, n, stride_dy, stride_x), x.element_size(), has_weight, has_bias,
                         tiling, device)
    w = x if weight is None else weight  # a placeholder pointer when absent: never read
    sums = int(has_weight) + int(has_bias)  # rows of per-program partial sums: dW's, then dB's
    partials = x.new_empty((sums, plan.n_partials, n), dtype=torch.float32)
    if not plan.column_tiled:
        launch_keyed(_backward_rows_kernel, plan.grid, plan.key, (dy, x, w, stats, dx, partials, *plan.scalars),
                     plan.meta, traceable)
    else:
        row_means = x.new_empty((2, m), dtype=torch.float32)  # mean(g * xhat), mean(g)
        launch_keyed(_backward_row_means_kernel, (m,), plan.key, (dy, x, w, stats, row_means, *plan.scalars),
                     plan.row_means_meta, traceable)
        launch_keyed(_backward_columns_kernel, plan.grid, plan.key,
                     (dy, x, w, stats, row_means, dx, partials, *plan.scalars), plan.meta, traceable)
    if not sums:
        return dx, None, None
    # One reduction over the programs' partial sums (deterministic: a fixed order for a fixed shape).
    # A torch op costs less host time per call than a second Triton launch, and allocates dW and dB.
    totals = partials.sum(dim=1).unbind()
    dw = _as_dtype(totals[0], weight.dtype) if has_weight else None
    db = _as_dtype(totals[-1], bias_dtype) if has_bias else None
    return dx, dw, db
