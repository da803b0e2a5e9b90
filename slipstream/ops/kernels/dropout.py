"""Triton kernel for seeded dropout over a 2-D view with any strides.

One Philox-4x32-10 call per (row, group of 8 columns) gives four 32-bit words, split into eight
16-bit numbers, one per column of the group (column ``8*g + j`` uses word ``j % 4``, low half for
``j < 4``, high half otherwise). An element is kept when its number is ``>= threshold``. The key is
the row's seed, or one seed for every row; the counter is ``(lo32(g), hi32(g), 0, 0)``. This is the
stream :func:`slipstream.ops.dropout.keep_mask` computes in PyTorch, bit for bit.

Imported only when a kernel is about to run (see ``slipstream.ops._backend``). The launcher holds
only shape-dependent Python and the launch, so the ``triton_op`` bodies that ``torch.compile``
traces call it too (``traceable=True``: the launch goes through ``wrap_triton``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from slipstream.ops._triton_op import launch_keyed
from slipstream.ops.kernels.host_math import cdiv, launch_key, memoized_plan, next_power_of_2

__all__ = ["launch_seeded_dropout"]

# Elements per program, and per thread (16 bf16 values: two 16-byte vectors); see benchmarks/dropout.py --tune.
BLOCK_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 16
_LANES = 8  # columns per Philox call (four words, two 16-bit halves each)
_INT32_MIN, _INT32_END = -(2**31), 2**31


@triton.jit(do_not_specialize=["seed"])
def _seeded_dropout_kernel(
    x_ptr,
    out_ptr,
    seeds_ptr,
    seed,
    n_rows,
    n_cols,
    x_stride_r,
    x_stride_c,
    out_stride_r,
    out_stride_c,
    seeds_stride,
    threshold,
    scale,
    col_blocks,
    PER_ROW_SEEDS: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    LANES: tl.constexpr = 8
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    groups = (pid % col_blocks) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    if INT64:  # offsets, and column indices of very wide rows, need 64 bits
        rows = rows.to(tl.int64)
        groups = groups.to(tl.int64)
    lanes = tl.arange(0, LANES)

    r = rows[:, None, None]
    c = groups[None, :, None] * LANES + lanes[None, None, :]
    inside = (r < n_rows) & (c < n_cols)
    x = tl.load(x_ptr + r * x_stride_r + c * x_stride_c, mask=inside)

    if PER_ROW_SEEDS:
        key = tl.load(seeds_ptr + rows * seeds_stride, mask=rows < n_rows, other=0)[:, None]
    else:
        key = seed
    c0 = groups.to(tl.uint32)[None, :]  # low word (truncation)
    if INT64:
        c1 = (groups >> 32).to(tl.uint32)[None, :]
    else:
        c1 = c0 * 0
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(key, c0, c1, zero, zero)

    word_index = lanes[None, None, :] % 4
    word = tl.where(
        word_index == 0,
        w0[:, :, None],
        tl.where(word_index == 1, w1[:, :, None], tl.where(word_index == 2, w2[:, :, None], w3[:, :, None])),
    )
    half_shift = ((lanes[None, None, :] // 4) * 16).to(tl.uint32)
    keep = ((word >> half_shift) & 0xFFFF) >= threshold

    if tl.constexpr(x.dtype.primitive_bitwidth) < 32:  # fp16/bf16: scale in fp32
        x = x.to(tl.float32)
    out = tl.where(keep, x * scale, 0.0)
    tl.store(out_ptr + r * out_stride_r + c * out_stride_c, out.to(out_ptr.dtype.element_ty), mask=inside)


def _reach(stride_r: int, stride_c: int, rows: int, cols: int) -> int:
    """Largest element offset a kernel computes for a tensor over a ``rows`` x ``cols`` padded grid."""
    return (rows - 1) * stride_r + (cols - 1) * stride_c


def _tile(n_rows: int, n_cols: int, column_major: bool, block_elements: int) -> tuple[int, int]:
    """(rows, column groups) per program: long along whichever dimension is contiguous in memory."""
    groups = cdiv(n_cols, _LANES)
    if column_major and n_rows > 1:  # e.g. a transposed view
        block_rows = min(64, next_power_of_2(n_rows))
        return block_rows, min(8, next_power_of_2(groups))
    block_groups = min(block_elements // _LANES, next_power_of_2(groups))
    block_rows = min(max(1, block_elements // (block_groups * _LANES)), next_power_of_2(n_rows))
    return block_rows, block_groups


def _matrix(t: torch.Tensor, one_row: bool) -> tuple[int, int, int, int]:
    """``(rows, cols, row stride, column stride)`` of a 2-D ``t``, or of a contiguous ``t`` read as one row.

    A single row gets row stride 0, which lets Triton prove 16-byte alignment of its accesses.
    """
    if one_row:
        return 1, t.numel(), 0, 1
    n_rows, n_cols = t.shape
    return n_rows, n_cols, (t.stride(0) if n_rows > 1 else 0), t.stride(1)


class _Plan(NamedTuple):
    """One launch of the kernel but its tensors and seed: grid, the arguments after the seed, constexprs and
    options, and the keys of it all (for a seed within int32 and for a wider one: Triton types the seed
    by its width)."""

    grid: tuple[int]
    scalars: tuple  # (n_rows, n_cols, strides..., threshold, scale, col_blocks)
    meta: dict  # shared by every launch with this plan: only ever spread with **
    int32_seed_key: int
    int64_seed_key: int


@functools.lru_cache(maxsize=1024)  # bounded: varying batch or sequence sizes each add a plan
def _plan(
    n_rows: int,
    n_cols: int,
    x_stride_r: int,
    x_stride_c: int,
    out_stride_r: int,
    out_stride_c: int,
    seeds_stride: int,
    threshold: int,
    scale: float,
    per_row: bool,
    int64: Optional[bool],
    block_elements: int,
    num_warps: Optional[int],
) -> _Plan:
    """The launch plan of :func:`launch_seeded_dropout` for these sizes and strides (``seeds_stride``: 0 without seeds).

    ``threshold``, ``scale``, ``int64``, ``block_elements`` and ``num_warps`` as given to :func:`launch_seeded_dropout`.
    """
    block_rows, block_groups = _tile(n_rows, n_cols, x_stride_r == 1 and x_stride_c != 1, block_elements)
    col_blocks = cdiv(n_cols, block_groups * _LANES)
    row_blocks = cdiv(n_rows, block_rows)
    if int64 is None:
        # Masked lanes of the last tiles still compute offsets: count the padded grid.
        rows, cols = row_blocks * block_rows, col_blocks * block_groups * _LANES
        seeds_reach = (rows - 1) * seeds_stride  # 0 without seeds
        reach = max(_reach(x_stride_r, x_stride_c, rows, cols), _reach(out_stride_r, out_stride_c, rows, cols))
        int64 = max(cols, seeds_reach, reach) >= 2**31
    num_warps = num_warps or max(1, min(8, block_rows * block_groups * _LANES // (32 * _ELEMENTS_PER_THREAD)))
    scalars = (n_rows, n_cols, x_stride_r, x_stride_c, out_stride_r, out_stride_c, seeds_stride, threshold,
               float(scale), col_blocks)
    meta = dict(PER_ROW_SEEDS=per_row, INT64=int64, BLOCK_ROWS=block_rows, BLOCK_GROUPS=block_groups,
                num_warps=num_warps)
    return _Plan((row_blocks * col_blocks,), scalars, meta, launch_key(), launch_key())


def launch_seeded_dropout(
    x: torch.Tensor,
    out: torch.Tensor,
    threshold: int,
    scale: float,
    seed: int = 0,
    seeds: Optional[torch.Tensor] = None,
    int64: Optional[bool] = None,
    block_elements: int = BLOCK_ELEMENTS,
    num_warps: Optional[int] = None,
    traceable: bool = False,
    one_row: bool = False,
) -> None:
    """Write ``where(keep, x * scale, 0)`` into ``out`` (same shape as ``x``).

    2-D ``x`` and ``out`` may have any strides. ``one_row``: ``x`` and ``out`` (any shape, both
    contiguous) are read as one row of ``x.numel()`` columns, without a reshape (which would cost
    host time on every call).
    ``seeds`` (int64, one per row of a 2-D ``x``, on ``x``'s device) keys each row; without it every
    row is keyed by ``seed``. ``int64`` forces (or forbids) 64-bit indexing; by default it is used
    only when an offset or a column index could pass 2**31. ``block_elements`` (a power of two
    >= 8) and ``num_warps`` set the tiling, for tuning. ``traceable``: launch through
    ``wrap_triton``, as a ``triton_op`` body must (see :mod:`slipstream.ops._triton_op`).
    """
    if x.numel() == 0:
        return
    n_rows, n_cols, x_stride_r, x_stride_c = _matrix(x, one_row)
    _, _, out_stride_r, out_stride_c = _matrix(out, one_row)
    per_row = seeds is not None
    seeds_stride = seeds.stride(0) if per_row else 0
    sizes = (n_rows, n_cols, x_stride_r, x_stride_c, out_stride_r, out_stride_c, seeds_stride)
    plan = memoized_plan(_plan, sizes, threshold, scale, per_row, int64, block_elements, num_warps)
    key = plan.int32_seed_key if _INT32_MIN <= seed < _INT32_END else plan.int64_seed_key
    launch_keyed(_seeded_dropout_kernel, plan.grid, key, (x, out, seeds if per_row else x, seed, *plan.scalars),
                 plan.meta, traceable)
