"""Triton GroupNorm kernels (forward and backward, optional fused SiLU) and their launchers.

Imported lazily by :mod:`slipstream.ops.group_norm`, only when a kernel is about to run.

How the work is cut. A (N, C, *spatial) tensor is read as (N, C, S) through its strides, so contiguous
(NCHW) and channels_last (NHWC) tensors are read and written in place. Every kernel works on 2D tiles
of ``CB`` channels x ``SB`` positions whose fast axis is the tensor's run of memory: positions for NCHW,
channels for channels_last, where a tile holds whole rows (every channel of ``SB`` positions). Each
pass (forward, backward) is two launches that stream through memory with a few registers per element,
so that many programs per SM keep enough loads in flight; no program ever waits for another:

* statistics: program (sample, channel block, chunk of positions) loops over its chunk's tiles,
  accumulating per channel, and writes the chunk's partials (forward: mean and sum of squared
  deviations; backward: the sums of ``w * dy'`` and ``w * dy' * xhat``, ``dy'`` being dy through SiLU's
  derivative when fused). Where a tile holds whole rows, the program first folds its channels into
  groups (through a staging copy in global memory, re-read group by group), so a sample leaves few
  partials. A counter per sample tells the program that finishes last; it combines the sample's
  partials in a fixed order into per-group values (mean and rstd forward; the group means of
  ``w * dy'`` and ``w * dy' * xhat`` backward). Counters live in half of a buffer kept across calls
  (:mod:`slipstream.ops.kernels.scratch`); each statistics launch zeroes the other half for the next.
* apply: program (sample, channel block, chunk) turns those values into per-channel coefficients once,
  then writes its chunk's output tile by tile (y forward, dx backward). Programs run in reverse order,
  so the chunks the statistics launch read last, the ones still in L2, are read again first.

Results are deterministic: partials are combined in a fixed order, never by atomic adds. Forward
statistics never subtract large sums: a chunk's deviations are taken from a pivot per channel (its
first value in the chunk), and chunks combine exactly (parallel axis theorem: a group's squared
deviations are the chunks' own plus each chunk's count times its mean's squared distance to the
group's mean). dW and dB are a ``torch.sum`` of per-(sample, chunk, channel) sums, in a fixed order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from slipstream.ops._triton_op import launch_keyed
from slipstream.ops.kernels.host_math import cdiv, launch_key, next_power_of_2
from slipstream.ops.kernels.scratch import barrier_words, discard_barrier_words, scratch

__all__ = ["forward", "backward", "Plan", "plan_for"]

# Elements of a tile, and elements each thread holds (sets the warps of a program). The statistics
# and apply programs of a pass use the same tiles.
TILE = 2048
ELEMENTS_PER_THREAD = 16
# A launch aims at this many programs (several per SM, so one SM's programs overlap their phases);
# a program loops over as many tiles as that leaves it. The statistics launch also keeps a sample's
# chunks at most MAX_CHUNKS, which bounds what the sample's last program combines.
STATS_PROGRAMS = 1024
APPLY_PROGRAMS = 2048
MAX_CHUNKS = 128
# Widest channels_last row a tile holds whole (channels, a power of two); wider rows are cut into
# channel blocks whose partials stay per channel.
MAX_ROW = 8192
# Partial values the combining program reads per step.
COMBINE_BLOCK = 4096

# What a tensor's strides give the kernels: which of its (channel, position) strides is 1.
UNIT_CHANNELS, UNIT_POSITIONS, UNIT_NONE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _program_place(vid, n_cblocks, n_chunks):
    """(sample, channel block, chunk) of program ``vid``; chunks vary fastest, so neighbouring programs
    read neighbouring memory."""
    chunk = vid % n_chunks
    rest = vid // n_chunks
    return rest // n_cblocks, rest % n_cblocks, chunk


@triton.jit
def _tile_offsets(c, s, sc, ss, UNIT: tl.constexpr):
    """64-bit in-sample offsets of a (channels, positions) tile. The stride UNIT names is the literal 1,
    so Triton sees the run of memory and vectorizes along it."""
    c64 = c.to(tl.int64)[:, None]
    s64 = s.to(tl.int64)[None, :]
    if UNIT == 0:
        offs = c64 + s64 * ss
    elif UNIT == 1:
        offs = c64 * sc + s64
    else:
        offs = c64 * sc + s64 * ss
    return offs


@triton.jit
def _affine(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel weight and bias in fp32 (ones and zeros when absent)."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c.shape, tl.float32)
    return w, b


@triton.jit
def _silu_grad(dy, z):
    """dy through SiLU's derivative at z: sig(z) * (1 + z * (1 - sig(z)))."""
    sig = 1.0 / (1.0 + tl.exp(-z))
    return dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _clear_for_next_launch(SYNC_NEXT, words, BLOCK: tl.constexpr = 128):
    """Zero this program's share of the counters the next statistics launch on this stream will use."""
    for start in range(tl.program_id(0) * BLOCK, words, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(SYNC_NEXT + offs, tl.zeros([BLOCK], tl.int32), mask=offs < words)


@triton.jit
def _arrives_last(counter, total):
    """Count this program in at ``counter``; True in the last of ``total`` programs to arrive, which then
    sees every other program's stores (they precede their own count)."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    tl.debug_barrier()
    return arrived == total - 1


@triton.jit
def _group_lanes(g0, C, G, CG: tl.constexpr, GBLK: tl.constexpr, CGP: tl.constexpr):
    """Lanes of ``GBLK`` whole groups, ``CGP`` (a power of two >= CG) lanes each: group, channel, mask."""
    j = tl.arange(0, GBLK * CGP)
    g = g0 + j // CGP
    c = g * CG + j % CGP
    return g, c, (j % CGP < CG) & (g < G)


@triton.jit
def _group_sum(v, GBLK: tl.constexpr, CGP: tl.constexpr):
    """Sum group lanes (``_group_lanes``) per group: (GBLK,)."""
    return tl.sum(tl.reshape(v, (GBLK, CGP)), axis=1)


@triton.jit
def _per_group_lane(v, GBLK: tl.constexpr, CGP: tl.constexpr):
    """Repeat a (GBLK,) vector over its groups' lanes."""
    return tl.reshape(tl.broadcast_to(v[:, None], (GBLK, CGP)), (GBLK * CGP,))


@triton.jit
def _fold_to_groups(STAGE, OUT, W, count, C, G, CG: tl.constexpr, GBLK: tl.constexpr, CGP: tl.constexpr,
                    HAS_W: tl.constexpr, FORWARD: tl.constexpr):
    """Fold one chunk's per-channel partials (staged at STAGE, (2, C)) into per-group ones at OUT (2, G).

    Forward: rows are (mean, squared deviations) over ``count`` positions a channel; backward: the sums
    of dy' and dy' * xhat, which fold into the sums of ``w * dy'`` and ``w * dy' * xhat``.
    """
    tl.debug_barrier()  # every thread's staging stores land before any thread reads them back
    for g0 in range(0, G, GBLK):
        g, c, lane = _group_lanes(g0, C, G, CG, GBLK, CGP)
        first = tl.load(STAGE + c, mask=lane, other=0.0)
        second = tl.load(STAGE + C + c, mask=lane, other=0.0)
        gg = g0 + tl.arange(0, GBLK)
        if FORWARD:
            mean = _group_sum(first, GBLK, CGP) / CG
            d = tl.where(lane, first - _per_group_lane(mean, GBLK, CGP), 0.0)
            second = second + count * d * d
            first = mean
        else:
            if HAS_W:
                w = tl.load(W + c, mask=lane, other=0.0).to(tl.float32)
                first = first * w
                second = second * w
            first = _group_sum(first, GBLK, CGP)
        tl.store(OUT + gg, first, mask=gg < G)
        tl.store(OUT + G + gg, _group_sum(second, GBLK, CGP), mask=gg < G)


@triton.jit
def _chunk_sums(PART, slot, lane, mean_lane, n_chunks, chunk_len, S, SLOTS, SLOT_POSITIONS: tl.constexpr,
                KB: tl.constexpr, FORWARD: tl.constexpr):
    """Two sums over a sample's chunks per lane, in blocks of KB chunks (a fixed order).

    Forward: the count-weighted means, and the squared deviations from ``mean_lane`` (parallel axis
    theorem); backward: the two partial rows as they are.
    """
    acc0 = tl.zeros(slot.shape, tl.float32)
    acc1 = tl.zeros(slot.shape, tl.float32)
    for k0 in range(0, n_chunks, KB):
        k = k0 + tl.arange(0, KB)
        mask = (k < n_chunks)[:, None] & lane[None, :]
        row = PART + (k * 2 * SLOTS)[:, None] + slot[None, :]
        first = tl.load(row, mask=mask, other=0.0, cache_modifier=".cg")
        second = tl.load(row + SLOTS, mask=mask, other=0.0, cache_modifier=".cg")
        if FORWARD:
            count = (tl.minimum(chunk_len, S - k * chunk_len) * SLOT_POSITIONS).to(tl.float32)[:, None]
            d = first - mean_lane[None, :]
            acc0 += tl.sum(tl.where(mask, count * first, 0.0), axis=0)
            acc1 += tl.sum(tl.where(mask, second + count * d * d, 0.0), axis=0)
        else:
            acc0 += tl.sum(first, axis=0)
            acc1 += tl.sum(second, axis=0)
    return acc0, acc1


@triton.jit
def _combine_sample(PART, OUT0, OUT1, W, n_chunks, chunk_len, S, G, eps, SLOTS, SLOT_CG: tl.constexpr,
                    CG: tl.constexpr, GBLK: tl.constexpr, CGP: tl.constexpr, KB: tl.constexpr,
                    HAS_W: tl.constexpr, PER_CHANNEL: tl.constexpr, FORWARD: tl.constexpr):
    """Combine one sample's partials (``PART``: (n_chunks, 2, SLOTS)) into two values per group.

    A slot is a channel (PER_CHANNEL, ``SLOT_CG`` = CG) or a whole group (``SLOT_CG`` = 1). Forward:
    (mean, squared deviations) per slot give (mean, rstd) at OUT0/OUT1, reading the partials twice
    (means, then deviations from the group's mean); backward: per-slot sums give the group means of
    ``w * dy'`` and ``w * dy' * xhat`` (per-channel slots hold the raw sums of dy' and dy' * xhat and
    are weighted here).
    """
    total = CG * 1.0 * S
    for g0 in range(0, G, GBLK):
        g, slot, lane = _group_lanes(g0, SLOTS, G, SLOT_CG, GBLK, CGP)
        gg = g0 + tl.arange(0, GBLK)
        zeros = tl.zeros([GBLK * CGP], tl.float32)
        acc0, acc1 = _chunk_sums(PART, slot, lane, zeros, n_chunks, chunk_len, S, SLOTS, CG // SLOT_CG, KB, FORWARD)
        if FORWARD:
            mean = _group_sum(acc0, GBLK, CGP) / total
            _, acc1 = _chunk_sums(PART, slot, lane, _per_group_lane(mean, GBLK, CGP), n_chunks, chunk_len, S, SLOTS,
                                  CG // SLOT_CG, KB, FORWARD)
            tl.store(OUT0 + gg, mean, mask=gg < G)
            tl.store(OUT1 + gg, 1.0 / tl.sqrt(_group_sum(acc1, GBLK, CGP) / total + eps), mask=gg < G)
        else:
            if HAS_W and PER_CHANNEL:
                w = tl.load(W + slot, mask=lane, other=0.0).to(tl.float32)
                acc0 = acc0 * w
                acc1 = acc1 * w
            tl.store(OUT0 + gg, _group_sum(acc0, GBLK, CGP) / total, mask=gg < G)
            tl.store(OUT1 + gg, _group_sum(acc1, GBLK, CGP) / total, mask=gg < G)


@triton.jit
def _finish_statistics(SCRATCH, OUT0, OUT1, W, SYNC, n, chunk, count, n_cblocks, n_chunks, chunk_len,
                       C, G, S, gr_at, eps, CG: tl.constexpr, BY_GROUP: tl.constexpr,
                       FOLD_GBLK: tl.constexpr, FOLD_CGP: tl.constexpr, COMB_GBLK: tl.constexpr,
                       COMB_CGP: tl.constexpr, KB: tl.constexpr, HAS_W: tl.constexpr, FORWARD: tl.constexpr):
    """After a statistics program stored its per-channel partials (SCRATCH, (N, n_chunks, 2, C)): fold
    them into groups where its tile held whole rows, count it in, and combine the sample if it is last."""
    piece = (n * n_chunks + chunk).to(tl.int64)
    if BY_GROUP:
        _fold_to_groups(SCRATCH + piece * 2 * C, SCRATCH + gr_at + piece * 2 * G, W, count, C, G, CG,
                        FOLD_GBLK, FOLD_CGP, HAS_W, FORWARD)
    if _arrives_last(SYNC + n, n_cblocks * n_chunks):
        first = (n * n_chunks).to(tl.int64)
        if BY_GROUP:
            _combine_sample(SCRATCH + gr_at + first * 2 * G, OUT0 + n * G, OUT1 + n * G, W, n_chunks, chunk_len,
                            S, G, eps, G, 1, CG, COMB_GBLK, COMB_CGP, KB, HAS_W, False, FORWARD)
        else:
            _combine_sample(SCRATCH + first * 2 * C, OUT0 + n * G, OUT1 + n * G, W, n_chunks, chunk_len,
                            S, G, eps, C, CG, CG, COMB_GBLK, COMB_CGP, KB, HAS_W, True, FORWARD)


@triton.jit
def _position_step(ss, SB: tl.constexpr, UNIT: tl.constexpr):
    """Offset from one tile to the next along positions."""
    if UNIT == 1:
        step = SB
    else:
        step = SB * ss
    return step


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sync_words"])  # grows with the buffer: one compiled kernel for all sizes
def _forward_stats_kernel(
    X, MEAN, RSTD, SCRATCH, SYNC, SYNC_NEXT, sync_words,
    C, G, S, n_cblocks, n_chunks, tiles, sxn, sxc, sxs, gr_at, eps,
    CG: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, UX: tl.constexpr, BY_GROUP: tl.constexpr,
    FOLD_GBLK: tl.constexpr, FOLD_CGP: tl.constexpr, COMB_GBLK: tl.constexpr, COMB_CGP: tl.constexpr,
    KB: tl.constexpr,
):
    _clear_for_next_launch(SYNC_NEXT, sync_words)
    n, cb, chunk = _program_place(tl.program_id(0), n_cblocks, n_chunks)
    c = cb * CB + tl.arange(0, CB)
    cmask = c < C
    chunk_len = tiles * SB
    s0 = chunk * chunk_len
    xs = X + n.to(tl.int64) * sxn
    # deviations from the channel's first value in the chunk: no large sums subtracted below
    pivot = tl.load(xs + c.to(tl.int64) * sxc + s0.to(tl.int64) * sxs, mask=cmask, other=0.0).to(tl.float32)
    ptrs = xs + _tile_offsets(c, s0 + tl.arange(0, SB), sxc, sxs, UX)
    step = _position_step(sxs, SB, UX)
    acc1 = tl.zeros([CB, SB], tl.float32)
    acc2 = tl.zeros([CB, SB], tl.float32)
    for t in range(tiles):
        s = s0 + t * SB + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        x = tl.load(ptrs + t * step, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - pivot[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    count = tl.minimum(chunk_len, S - s0).to(tl.float32)
    s1 = tl.sum(acc1, axis=1)
    s2 = tl.sum(acc2, axis=1)
    stage = SCRATCH + (n * n_chunks + chunk).to(tl.int64) * 2 * C
    tl.store(stage + c, pivot + s1 / count, mask=cmask)
    tl.store(stage + C + c, tl.maximum(s2 - s1 * (s1 / count), 0.0), mask=cmask)
    _finish_statistics(SCRATCH, MEAN, RSTD, X, SYNC, n, chunk, count, n_cblocks, n_chunks, chunk_len, C, G, S,
                       gr_at, eps, CG, BY_GROUP, FOLD_GBLK, FOLD_CGP, COMB_GBLK, COMB_CGP, KB, False, True)


@triton.jit
def _forward_apply_kernel(
    X, Y, W, B, MEAN, RSTD,
    C, G, S, n_cblocks, n_chunks, tiles, sxn, sxc, sxs, syn, syc, sys_,
    CG: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, UX: tl.constexpr, UY: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
):
    n, cb, chunk = _program_place(tl.num_programs(0) - 1 - tl.program_id(0), n_cblocks, n_chunks)
    c = cb * CB + tl.arange(0, CB)
    cmask = c < C
    stat = n * G + c // CG
    mean = tl.load(MEAN + stat, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + stat, mask=cmask, other=0.0)
    w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
    scale = (rstd * w)[:, None]
    shift = (b - mean * rstd * w)[:, None]
    s0 = chunk * tiles * SB
    x_ptrs = X + n.to(tl.int64) * sxn + _tile_offsets(c, s0 + tl.arange(0, SB), sxc, sxs, UX)
    y_ptrs = Y + n.to(tl.int64) * syn + _tile_offsets(c, s0 + tl.arange(0, SB), syc, sys_, UY)
    x_step = _position_step(sxs, SB, UX)
    y_step = _position_step(sys_, SB, UY)
    for t in range(tiles):
        s = s0 + t * SB + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        z = tl.load(x_ptrs + t * x_step, mask=mask, other=0.0).to(tl.float32) * scale + shift
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(y_ptrs + t * y_step, z.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _channel_statistics(MEAN, RSTD, n, G, c, cmask, CG: tl.constexpr):
    stat = n * G + c // CG
    return (tl.load(MEAN + stat, mask=cmask, other=0.0)[:, None],
            tl.load(RSTD + stat, mask=cmask, other=0.0)[:, None])


@triton.jit(do_not_specialize=["sync_words"])
def _backward_stats_kernel(
    X, DY, W, B, MEAN, RSTD, SCRATCH, SYNC, SYNC_NEXT, sync_words,
    C, G, S, n_cblocks, n_chunks, tiles, sxn, sxc, sxs, sdn, sdc, sds, gr_at, vals_at, vals1_at,
    CG: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, UX: tl.constexpr, UD: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BY_GROUP: tl.constexpr,
    FOLD_GBLK: tl.constexpr, FOLD_CGP: tl.constexpr, COMB_GBLK: tl.constexpr, COMB_CGP: tl.constexpr,
    KB: tl.constexpr,
):
    _clear_for_next_launch(SYNC_NEXT, sync_words)
    n, cb, chunk = _program_place(tl.program_id(0), n_cblocks, n_chunks)
    c = cb * CB + tl.arange(0, CB)
    cmask = c < C
    mean, rstd = _channel_statistics(MEAN, RSTD, n, G, c, cmask, CG)
    w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
    chunk_len = tiles * SB
    s0 = chunk * chunk_len
    x_ptrs = X + n.to(tl.int64) * sxn + _tile_offsets(c, s0 + tl.arange(0, SB), sxc, sxs, UX)
    dy_ptrs = DY + n.to(tl.int64) * sdn + _tile_offsets(c, s0 + tl.arange(0, SB), sdc, sds, UD)
    x_step = _position_step(sxs, SB, UX)
    dy_step = _position_step(sds, SB, UD)
    acc_dy = tl.zeros([CB, SB], tl.float32)
    acc_dy_xhat = tl.zeros([CB, SB], tl.float32)
    for t in range(tiles):
        s = s0 + t * SB + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        x = tl.load(x_ptrs + t * x_step, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptrs + t * dy_step, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:  # z recomputed from x; masked lanes keep dy = 0
            dy = _silu_grad(dy, xhat * w[:, None] + b[:, None])
        acc_dy += dy
        acc_dy_xhat += dy * xhat
    stage = SCRATCH + (n * n_chunks + chunk).to(tl.int64) * 2 * C
    tl.store(stage + c, tl.sum(acc_dy, axis=1), mask=cmask)
    tl.store(stage + C + c, tl.sum(acc_dy_xhat, axis=1), mask=cmask)
    _finish_statistics(SCRATCH, SCRATCH + vals_at, SCRATCH + vals1_at, W, SYNC, n, chunk, 0.0, n_cblocks, n_chunks,
                       chunk_len, C, G, S, gr_at, 0.0, CG, BY_GROUP, FOLD_GBLK, FOLD_CGP, COMB_GBLK, COMB_CGP, KB,
                       HAS_W, False)


@triton.jit
def _backward_apply_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SCRATCH,
    C, G, S, n_cblocks, n_chunks, tiles, sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, vals_at, vals1_at,
    CG: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, UX: tl.constexpr, UD: tl.constexpr, UG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
):
    n, cb, chunk = _program_place(tl.num_programs(0) - 1 - tl.program_id(0), n_cblocks, n_chunks)
    c = cb * CB + tl.arange(0, CB)
    cmask = c < C
    mean, rstd = _channel_statistics(MEAN, RSTD, n, G, c, cmask, CG)
    # the group means of w * dy' and w * dy' * xhat, from the statistics launch
    mean_g, mean_gx = _channel_statistics(SCRATCH + vals_at, SCRATCH + vals1_at, n, G, c, cmask, CG)
    w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
    w = w[:, None]
    s0 = chunk * tiles * SB
    x_ptrs = X + n.to(tl.int64) * sxn + _tile_offsets(c, s0 + tl.arange(0, SB), sxc, sxs, UX)
    dy_ptrs = DY + n.to(tl.int64) * sdn + _tile_offsets(c, s0 + tl.arange(0, SB), sdc, sds, UD)
    dx_ptrs = DX + n.to(tl.int64) * sgn + _tile_offsets(c, s0 + tl.arange(0, SB), sgc, sgs, UG)
    x_step = _position_step(sxs, SB, UX)
    dy_step = _position_step(sds, SB, UD)
    dx_step = _position_step(sgs, SB, UG)
    for t in range(tiles):
        s = s0 + t * SB + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        x = tl.load(x_ptrs + t * x_step, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptrs + t * dy_step, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:
            dy = _silu_grad(dy, xhat * w + b[:, None])
        dx = (dy * w - mean_g - xhat * mean_gx) * rstd
        tl.store(dx_ptrs + t * dx_step, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """How the kernels cut one (N, C, S) input (module docstring)."""

    channels: int  # CB: channels of a tile
    positions: int  # SB: positions of a tile
    channel_blocks: int
    channels_major: bool  # a tile's fast axis is channels (channels_last)
    stats_tiles: int  # tiles a statistics program loops over
    stats_chunks: int  # statistics programs a (sample, channel block)
    apply_tiles: int
    apply_chunks: int
    num_warps: int
    by_group: bool  # statistics programs fold their tile's whole rows into groups
    fold_groups: int  # groups the fold handles a step
    group_lanes: int  # lanes a group takes in folds and per-channel combines: a power of two >= C/G
    combine_groups: int  # groups the combining program handles a step
    combine_lanes: int  # lanes a group takes there: group_lanes, or 1 for per-group partials
    combine_rows: int  # chunks the combining program reads a step

    def scratch_layout(self, n: int, c: int, g: int) -> tuple[int, int]:
        """fp32 offsets of the per-group partials and of what follows them; per-channel ones come first."""
        per_channel = _round16(n * self.stats_chunks * 2 * c)
        per_group = _round16(n * self.stats_chunks * 2 * g) if self.by_group else 0
        return per_channel, per_channel + per_group


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


@functools.lru_cache(maxsize=4096)
def plan_for(n: int, c: int, s: int, num_groups: int, channels_major: bool, tile: int = TILE) -> Plan:
    """The plan for an (n, c, s) input in ``num_groups`` groups: tiles, chunks, warps and combine widths.

    Module settings are read on every call (the benchmark's sweeps change them); the result is cached
    by those settings in :func:`_cached_plan`.

    Example:
        >>> p = plan_for(16, 256, 4096, 32, channels_major=True)
        >>> (p.channels, p.positions, p.by_group, p.stats_chunks)
        (256, 8, True, 64)
    """
    return _cached_plan(n, c, s, num_groups, channels_major, tile, ELEMENTS_PER_THREAD, STATS_PROGRAMS,
                        APPLY_PROGRAMS, MAX_CHUNKS, MAX_ROW, COMBINE_BLOCK)


@functools.lru_cache(maxsize=4096)
def _cached_plan(n: int, c: int, s: int, num_groups: int, channels_major: bool, tile: int,
                 elements_per_thread: int, stats_programs: int, apply_programs: int, max_chunks: int,
                 max_row: int, combine_block: int) -> Plan:
    cg = c // num_groups
    if channels_major:
        cb = min(next_power_of_2(c), max_row)
        sb = min(max(1, tile // cb), next_power_of_2(s))
    else:
        sb = min(next_power_of_2(s), tile)
        cb = min(next_power_of_2(c), max(1, tile // sb))
    channel_blocks = cdiv(c, cb)
    position_tiles = cdiv(s, sb)
    tiles = n * channel_blocks * position_tiles
    stats_tiles = min(position_tiles, max(cdiv(tiles, stats_programs), cdiv(position_tiles, max_chunks)))
    apply_tiles = min(position_tiles, cdiv(tiles, apply_programs))
    stats_chunks = cdiv(position_tiles, stats_tiles)
    by_group = channels_major and channel_blocks == 1 and cg > 1
    group_lanes = next_power_of_2(cg)
    fold_groups = max(1, min(next_power_of_2(num_groups), combine_block // (2 * group_lanes)))
    combine_lanes = 1 if by_group else group_lanes
    combine_groups = max(1, min(next_power_of_2(num_groups), combine_block // combine_lanes))
    combine_rows = max(1, min(next_power_of_2(stats_chunks), combine_block // (combine_groups * combine_lanes)))
    return Plan(cb, sb, channel_blocks, channels_major, stats_tiles, stats_chunks, apply_tiles,
                cdiv(position_tiles, apply_tiles), max(1, min(16, cb * sb // (32 * elements_per_thread))),
                by_group, fold_groups, group_lanes, combine_groups, combine_lanes, combine_rows)


def _ncs_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(N, C, S) strides of ``t`` with its spatial dims flattened, or None if they do not flatten."""
    return _ncs_strides_of(t.shape, t.stride())  # memoized: a model's norms see few layouts


@functools.lru_cache(maxsize=4096)
def _ncs_strides_of(shape: tuple[int, ...], strides: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
    spatial = [(size, stride) for size, stride in zip(shape[2:], strides[2:]) if size != 1]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:]):
        if outer != inner * size:
            return None
    return strides[0], strides[1], spatial[-1][1] if spatial else 1


def _flattened(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(t, its (N, C, S) strides)``: ``t`` itself when its spatial dims flatten to one stride, else a
    contiguous copy. The strides are computed once per call (each computation is host time)."""
    strides = _ncs_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _ncs_strides(t)
    return t, strides


def _unit(strides: tuple[int, int, int], channels_major: bool) -> int:
    """Which of a tensor's (channel, position) strides the kernels may take as the literal 1."""
    _, sc, ss = strides
    if sc == 1 and (channels_major or ss != 1):
        return UNIT_CHANNELS
    if ss == 1:
        return UNIT_POSITIONS
    return UNIT_CHANNELS if sc == 1 else UNIT_NONE


def _input_plan(x: torch.Tensor, strides: tuple[int, int, int], num_groups: int, tile: Optional[int]) -> Plan:
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    _, sc, ss = strides
    return plan_for(n, c, s, num_groups, sc == 1 and ss != 1 and c > 1 and s > 1, tile or TILE)


class _Step(NamedTuple):
    """One kernel launch of a configuration: everything but its tensors, memoized, and the memo's key."""

    kernel: object
    grid: tuple[int]
    scalars: tuple  # the kernel's positional arguments after its tensors
    meta: dict  # constexprs and launch options
    key: int  # unique to this memo (see ``CachedLauncher.launch_keyed``)


def _stats_meta(plan: Plan, cg: int) -> dict:
    return dict(CG=cg, CB=plan.channels, SB=plan.positions, BY_GROUP=plan.by_group, FOLD_GBLK=plan.fold_groups,
                FOLD_CGP=plan.group_lanes, COMB_GBLK=plan.combine_groups, COMB_CGP=plan.combine_lanes,
                KB=plan.combine_rows, num_warps=plan.num_warps)


def _grids(plan: Plan, n: int) -> tuple[tuple[int], tuple[int]]:
    blocks = n * plan.channel_blocks
    return (blocks * plan.stats_chunks,), (blocks * plan.apply_chunks,)


@functools.lru_cache(maxsize=4096)
def _forward_steps(plan: Plan, n: int, c: int, s: int, num_groups: int, x_strides: tuple[int, int, int],
                   y_strides: tuple[int, int, int], eps: float, has_w: bool, has_b: bool,
                   silu: bool) -> tuple[_Step, _Step]:
    cg = c // num_groups
    ux, uy = _unit(x_strides, plan.channels_major), _unit(y_strides, plan.channels_major)
    gr_at, _ = plan.scratch_layout(n, c, num_groups)
    stats_grid, apply_grid = _grids(plan, n)
    shape = (c, num_groups, s, plan.channel_blocks)
    stats = _Step(_forward_stats_kernel, stats_grid,
                  (*shape, plan.stats_chunks, plan.stats_tiles, *x_strides, gr_at, eps),
                  dict(_stats_meta(plan, cg), UX=ux), launch_key())
    apply = _Step(_forward_apply_kernel, apply_grid, (*shape, plan.apply_chunks, plan.apply_tiles, *x_strides, *y_strides),
                  dict(CG=cg, CB=plan.channels, SB=plan.positions, UX=ux, UY=uy, HAS_W=has_w, HAS_B=has_b, SILU=silu,
                       num_warps=plan.num_warps), launch_key())
    return stats, apply


@functools.lru_cache(maxsize=4096)
def _backward_steps(plan: Plan, n: int, c: int, s: int, num_groups: int, strides: tuple[tuple[int, int, int], ...],
                    has_w: bool, has_b: bool, silu: bool) -> tuple[_Step, _Step]:
    cg = c // num_groups
    x_strides, dy_strides, dx_strides = strides
    ux, ud, ug = (_unit(t, plan.channels_major) for t in strides)
    gr_at, vals_at = plan.scratch_layout(n, c, num_groups)
    vals = (vals_at, vals_at + n * num_groups)  # the group means of w*dy' and of w*dy'*xhat, (N, G) each
    stats_grid, apply_grid = _grids(plan, n)
    shape = (c, num_groups, s, plan.channel_blocks)
    flags = dict(HAS_W=has_w, HAS_B=has_b, SILU=silu)
    stats = _Step(_backward_stats_kernel, stats_grid,
                  (*shape, plan.stats_chunks, plan.stats_tiles, *x_strides, *dy_strides, gr_at, *vals),
                  dict(_stats_meta(plan, cg), UX=ux, UD=ud, **flags), launch_key())
    apply = _Step(_backward_apply_kernel, apply_grid,
                  (*shape, plan.apply_chunks, plan.apply_tiles, *x_strides, *dy_strides, *dx_strides, *vals),
                  dict(CG=cg, CB=plan.channels, SB=plan.positions, UX=ux, UD=ud, UG=ug, num_warps=plan.num_warps,
                       **flags), launch_key())
    return stats, apply


def _launch(steps: tuple[_Step, _Step], stats_tensors: tuple, apply_tensors: tuple, n: int,
            device: torch.device) -> None:
    """The statistics launch (with this call's counters) then the apply launch."""
    stats, apply = steps
    words, next_words = barrier_words(device, n)
    try:  # (free when nothing is raised, unlike a context manager)
        launch_keyed(stats.kernel, stats.grid, stats.key,
                     (*stats_tensors, words, next_words, next_words.numel(), *stats.scalars), stats.meta)
    except BaseException:
        discard_barrier_words(device)  # nobody zeroed the words the next launch would count in
        raise
    launch_keyed(apply.kernel, apply.grid, apply.key, apply_tensors + apply.scalars, apply.meta)


def forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    silu: bool,
    out_dtype: torch.dtype,
    tile: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (then SiLU if ``silu``) of ``x``: returns ``(y, mean, rstd)``, statistics fp32 (N, G).

    ``y`` has ``x``'s shape and memory layout and dtype ``out_dtype``. ``tile`` bounds the elements of a
    tile (default ``TILE``, read at call time; tests shrink it to cut small inputs into many tiles).
    """
    x, x_strides = _flattened(x)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    y = torch.empty_like(x, dtype=out_dtype)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    plan = _input_plan(x, x_strides, num_groups, tile)
    has_w, has_b = weight is not None, bias is not None
    steps = _forward_steps(plan, n, c, s, num_groups, x_strides, _ncs_strides(y), eps, has_w, has_b, silu)
    work = scratch(x.device, plan.scratch_layout(n, c, num_groups)[1])
    w, b = weight if has_w else x, bias if has_b else x  # never read when absent
    _launch(steps, (x, mean, rstd, work), (x, y, w, b, mean, rstd), n, x.device)
    return y, mean, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
    tile: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`forward`; ``dx`` has ``x``'s layout and dtype.

    ``dweight``/``dbias`` are None when ``weight``/``bias`` is None; ``tile`` as in :func:`forward`.
    """
    x, x_strides = _flattened(x)
    dy, dy_strides = _flattened(dy)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    dx = torch.empty_like(x)
    plan = _input_plan(x, x_strides, num_groups, tile)
    has_w, has_b = weight is not None, bias is not None
    steps = _backward_steps(plan, n, c, s, num_groups, (x_strides, dy_strides, _ncs_strides(dx)), has_w, has_b,
                            silu)
    _, vals_at = plan.scratch_layout(n, c, num_groups)
    work = scratch(x.device, vals_at + 2 * n * num_groups)
    w, b = weight if has_w else x, bias if has_b else x
    _launch(steps, (x, dy, w, b, mean, rstd, work), (x, dy, dx, w, b, mean, rstd, work), n, x.device)
    if not (has_w or has_b):
        return dx, None, None
    # dB and dW: the per-(sample, chunk, channel) sums of dy' and dy' * xhat the statistics launch left
    # first in scratch, (N * chunks, 2, C), summed in one fixed-order reduction. The two may be views of
    # one buffer: callers whose outputs must not alias (a custom op) copy one.
    pieces = n * plan.stats_chunks
    dbias_sum, dweight_sum = work.as_strided((2, pieces, c), (c, 2 * c, 1)).sum(dim=1).unbind()
    dweight = dweight_sum.to(weight.dtype) if has_w else None
    dbias = dbias_sum.to(bias.dtype) if has_b else None
    return dx, dweight, dbias
