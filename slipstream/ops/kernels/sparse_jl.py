"""Triton kernel for the seeded sparse JL projection: ``out = a @ S`` or ``out = a @ S.T``.

Each program owns a ``BLOCK_M x BLOCK_N`` tile of ``out`` and walks the reduction dimension in steps
of ``BLOCK_R``. Per step it loads a tile of ``a``, builds the matching block of ``S`` in registers
from Philox words (:func:`_sign_block`, the bit layout documented in :mod:`slipstream.ops.sparse_jl`)
and multiplies on the tensor cores with the block as wgmma's register operand; ``S`` never touches
memory. Tiles hold the unscaled entries ``0`` and
``+-2`` (exact in bf16, fp16 and tf32); the scale ``sqrt(s / k) / 2`` is applied once at the end.
Narrow outputs split the reduction over several programs (``SPLIT`` partial sums in fp32, added by
the launcher) so that the grid still covers the GPU.

Imported only when a kernel is about to run (see ``slipstream.ops._backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from slipstream.ops._backend import interpreting
from slipstream.ops._triton_op import launcher
from slipstream.ops.sparse_jl import PHILOX_STREAM
from slipstream.ops.kernels.host_math import cdiv

__all__ = ["TileConfig", "with_split", "choose_config", "launch_projection"]

_STREAM = tl.constexpr(PHILOX_STREAM)


@triton.jit
def _keep_and_sign(a, b):
    """``s = 8`` word: sign bits from ``a``'s odd bits, keep bits the AND of three fair bits."""
    return (a & 0xAAAAAAAA) | (a & b & (b >> 1) & 0x55555555)


@triton.jit
def _column_words(seed, first_row, first_col, COLS: tl.constexpr, SPARSITY: tl.constexpr):
    """``Z`` words of rows ``first_row + [0, 64)``, columns ``first_col + [0, COLS)``: ``[w, g, t, h, r]``.

    Shape ``[8, 8, 4, 2, COLS // 128]``; the first three dimensions index the Philox call, the last
    two its words (column ``128 r + 16 w + 8 h + g`` of the block, rows ``2 t + ...``).
    """
    w = tl.arange(0, 8)[:, None, None]
    g = tl.arange(0, 8)[None, :, None]
    t = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros([8, 8, 4], dtype=tl.uint32)
    stream = zero + ((w << 5) | (g << 2) | t | _STREAM).to(tl.uint32)
    row_block = tl.cast(first_row, tl.int64) // 64
    lo = zero + (row_block & 0xFFFFFFFF).to(tl.uint32)
    hi = zero + (row_block >> 32).to(tl.uint32)
    if SPARSITY == 2:  # words of (r, h) = (0, 0), (0, 1), (1, 0), (1, 1)
        w0, w1, w2, w3 = tl.philox(seed, lo, hi, zero + tl.cast(first_col // 256, tl.uint32), stream)
        if COLS == 256:
            z = tl.join(tl.join(w0, w1), tl.join(w2, w3))
        else:  # the block holds one r
            second = (first_col // 128) % 2 == 1
            z = tl.join(tl.where(second, w2, w0), tl.where(second, w3, w1))[:, :, :, :, None]
    else:  # s = 8: call 2J + r gives (A, B) for h = 0, then for h = 1
        a0, b0, a1, b1 = tl.philox(seed, lo, hi, zero + tl.cast(first_col // 128, tl.uint32), stream)
        z = tl.join(_keep_and_sign(a0, b0), _keep_and_sign(a1, b1))[:, :, :, :, None]
        if COLS == 256:
            a0, b0, a1, b1 = tl.philox(seed, lo, hi, zero + tl.cast(first_col // 128 + 1, tl.uint32), stream)
            z = tl.join(z, tl.join(_keep_and_sign(a0, b0), _keep_and_sign(a1, b1))[:, :, :, :, None])
            z = tl.reshape(z, [8, 8, 4, 2, 2])
    return z


@triton.jit
def _sign_block(seed, first_row, first_col, COLS: tl.constexpr, SPARSITY: tl.constexpr,
                DTYPE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``(2 / scale) * S[first_row:+64, first_col:+COLS].T`` (untransposed if ``TRANSPOSED``).

    Entries are bit patterns made with shifts and masks, no compares or conversions: bits 14 and 15
    of a 16-bit lane are an entry's keep and sign bits, which makes it exactly ``0``, ``+2`` or ``-2``
    (``-0`` when a dropped entry's sign bit is set); fp32 takes the same patterns shifted up 16 bits.
    The words of one Philox call expand into exactly the elements one thread holds of wgmma's
    register operand ``S.T`` (two adjacent rows per 32-bit register), so in the projection the block
    never leaves registers. (The transpose's operand ``S`` and tf32's layout need one shuffle.)
    """
    REPS: tl.constexpr = COLS // 128
    z = _column_words(seed, first_row, first_col, COLS, SPARSITY)[:, :, :, :, :, None]
    pair = tl.arange(0, 8).to(tl.uint32)[None, None, None, None, None, :]
    both = (z << (14 - 2 * pair)) & 0xC000C000  # low half: row bit b = 0, high half: b = 1
    entries = tl.join(both.to(tl.uint16), (both >> 16).to(tl.uint16))
    entries = tl.reshape(entries, [8, 8, 4, 2, REPS, 4, 2, 2])  # w, g, t, h, r, c, e, b
    if TRANSPOSED:  # rows 16 c + 8 e + 2 t + b, columns 128 r + 16 w + 8 h + g
        block = tl.reshape(tl.permute(entries, (5, 6, 2, 7, 4, 0, 3, 1)), [64, COLS])
    else:
        block = tl.reshape(tl.permute(entries, (4, 0, 3, 1, 5, 6, 2, 7)), [COLS, 64])
    if DTYPE.primitive_bitwidth == 32:
        block = block.to(tl.uint32) << 16
    return block.to(DTYPE, bitcast=True)


@triton.jit(do_not_specialize=["seed"])
def _projection_kernel(
    a_ptr, out_ptr, M, N, R, stride_am, stride_ar, stride_split, stride_om, seed, scale, split_size,
    SPARSITY: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
):
    """``out[split] = scale * a[:, part] @ S[part, :]`` (``S.T[part, :]`` if ``TRANSPOSED``) over part ``split`` of R.

    Computed transposed, ``out.T = S.T @ a.T``, so that the generated block is the register operand
    of Hopper's wgmma (no shared-memory round trip of its own) and ``a.T`` streams through shared
    memory. ``tl.range(num_stages=...)`` is what lets Triton pipeline those loads although the other
    operand is computed in the loop.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    # Programs sharing a row block of ``a`` run side by side, so it is read from HBM about once.
    first_m = (pid // n_tiles) * BLOCK_M
    first_n = (pid % n_tiles) * BLOCK_N
    rm = first_m + tl.arange(0, BLOCK_M).to(tl.int64)
    r_start = tl.program_id(1) * split_size
    r_end = tl.minimum(r_start + split_size, R)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for r0 in tl.range(r_start, r_end, BLOCK_R, num_stages=STAGES):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)  # rr * stride_ar passes 2**31 on column-major a
        # Splits end on block boundaries, so only ``R`` needs masking (and it keeps the loads wide).
        a_t = tl.load(a_ptr + rr[:, None] * stride_ar + rm[None, :] * stride_am,
                      mask=(rr[:, None] < R) & (rm[None, :] < M), other=0.0)
        if TRANSPOSED:  # out columns are rows of S: the block of S itself
            s = _sign_block(seed, first_n, r0, BLOCK_R, SPARSITY, a_t.dtype, True)
        else:
            s = _sign_block(seed, r0, first_n, BLOCK_N, SPARSITY, a_t.dtype, False)
        if DOT_IN_FP32:  # Triton's CPU interpreter multiplies bf16 operands as raw 16-bit integers
            acc = tl.dot(s.to(tl.float32), a_t.to(tl.float32), acc)
        elif r0 >= 0:
            # Always true, but Triton cannot prove it, so the wgmma completes within the step. Left
            # asynchronous across steps, Triton 3.6 lets the next step's block overwrite the
            # registers that in-flight wgmmas still read (undefined in PTX; it corrupted results
            # on an H100). Overlap comes from two programs per SM instead (see the defaults).
            acc = tl.dot(s, a_t, acc, input_precision=DOT_PRECISION)

    rn = first_n + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + tl.program_id(1).to(tl.int64) * stride_split + rm[None, :] * stride_om + rn[:, None]
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of :func:`_projection_kernel`; ``split`` programs share each output tile's reduction.

    A generated block always spans 64 rows of ``S``: ``block_r`` is 64 for the projection and
    ``block_n`` is 64 for the transpose; the block's other side (columns of ``S``) is 128 or 256.
    """

    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int
    split: int = 1


# Shapes that fit two programs per SM (at most 128 registers a thread with 8 warps), so one program
# generates its block while the other's wgmma runs; ``benchmarks/sparse_jl.py --sweep`` compares others.
_PROJECT_16BIT = TileConfig(128, 128, 64, 8, 3)
_PROJECT_FP32 = TileConfig(64, 128, 64, 8, 3)
_TRANSPOSE = TileConfig(64, 64, 128, 8, 3)
# Triton's CPU interpreter: small tiles keep the tests fast.
_INTERPRETER_PROJECT = TileConfig(16, 128, 64, 2, 1)
_INTERPRETER_TRANSPOSE = TileConfig(16, 64, 128, 2, 1)


def with_split(config: TileConfig, m: int, n: int, r: int, sm_count: int) -> TileConfig:
    """``config`` with the reduction split so that an ``(m x r) @ (r x n)`` product fills ``sm_count`` SMs.

    With at most half as many output tiles as SMs, the reduction is split (parts of at least 4 steps).

    Example:
        >>> with_split(TileConfig(256, 128, 64, 8, 3), 4096, 256, 4096, 132).split
        4
    """
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    steps = cdiv(r, config.block_r)
    return replace(config, split=max(1, min(sm_count // tiles, steps // 4)))


def choose_config(m: int, n: int, r: int, transposed: bool, dtype: torch.dtype, sm_count: int) -> TileConfig:
    """The tile shape for an ``(m x r) @ (r x n)`` projection (or transpose) on a GPU with ``sm_count`` SMs.

    Under Triton's interpreter, small fixed tiles instead (the interpreter's cost grows with tile size).

    Example (compiled kernels):
        >>> choose_config(4096, 1024, 65536, False, torch.bfloat16, 132)
        TileConfig(block_m=128, block_n=128, block_r=64, num_warps=8, num_stages=3, split=1)
    """
    if interpreting():
        return _INTERPRETER_TRANSPOSE if transposed else _INTERPRETER_PROJECT
    if transposed:
        config = _TRANSPOSE
    else:
        config = _PROJECT_FP32 if dtype == torch.float32 else _PROJECT_16BIT
    return with_split(config, m, n, r, sm_count)


def launch_projection(
    a: torch.Tensor, n: int, seed: int, sparsity: int, scale: float, transposed: bool, config: TileConfig | None = None
) -> torch.Tensor:
    """``scale / 2 * a @ E`` for ``E`` the ``{0, +-2}`` entries of ``S`` (``S.T`` if ``transposed``), for 2-D ``a``.

    ``a`` is ``(m, r)`` with any strides; the result is a new contiguous ``(m, n)`` tensor in
    ``a``'s dtype. ``config`` overrides :func:`choose_config` (benchmarks use it to compare shapes).

    Example:
        >>> y = launch_projection(torch.randn(8, 64, device="cuda"), 32, 1, 2, 0.25, False)  # doctest: +SKIP
    """
    m, r = a.shape
    if config is None:
        sm_count = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
        config = choose_config(m, n, r, transposed, a.dtype, sm_count)
    steps = cdiv(r, config.block_r)
    split_size = cdiv(steps, config.split) * config.block_r
    split = cdiv(r, split_size)
    if split == 1:
        out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n), split)
    launcher(False)(_projection_kernel)[grid](
        a, out, m, n, r, a.stride(0), a.stride(1), out.stride(0) if split > 1 else 0, out.stride(-2),
        seed, scale / 2, split_size,
        SPARSITY=sparsity, TRANSPOSED=transposed,
        DOT_PRECISION="tf32" if a.dtype == torch.float32 else "ieee",
        DOT_IN_FP32=interpreting() and a.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r, STAGES=config.num_stages,
        num_warps=config.num_warps,
    )
    return out if split == 1 else out.sum(0).to(a.dtype)  # one rounding: sum the fp32 partials in fp32
