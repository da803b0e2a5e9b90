"""Triton GroupNorm kernels (forward and backward, optional fused SiLU) and their launchers.

Imported lazily by :mod:`slipstream.ops.group_norm`, only when a kernel is about to run.

How the work is cut. A (N, C, *spatial) tensor is read as (N, C, S) through its strides, so
contiguous (NCHW) and channels_last (NHWC) tensors are read and written in place. A group's
(C/G channels x S positions) plane is cut into tiles of ``GB`` groups x ``CB`` channels x ``SB``
positions; the tiles covering the same groups of one sample form a *set* of ``K`` programs. A
channels_last tile is held as a 2D (positions, channels) block whose channel axis is one run of
memory: Triton vectorizes and coalesces a load along one tile axis only, and a 3D (positions,
groups, channels) tile ran 2-3x slower on the H200 than the same bytes read as 2D rows. Group
sums and per-group values then go through a reshape to (groups, channels) where a row is whole
groups of a power-of-two width, else through a (groups x channels) one-hot mask. Each
program keeps its tile in registers, writes the group-level partial sums of its tile, and needs the
whole set's partials before it can write its output. Four ways to get them:

* a set of one program (the group fits in a tile): statistics straight from registers, one launch.
* fused (GPU, ``K`` <= number of SMs): one launch; the set's programs meet at a barrier (an atomic
  counter per set). Small sets: each program combines the partials itself, in the same fixed order,
  so every program gets bit-identical statistics. Large sets: the last program to arrive combines
  them and raises a flag; the others wait for it and read its result. Programs take their place in
  the grid from an atomic ticket, so a program only ever waits for programs that started after it:
  with ``K`` no larger than the number of SMs (one program per SM always fits), every set completes
  whatever order the hardware starts programs in. The barrier words (the ticket, then a counter
  and a flag per set) are zero when a launch starts. They are half of a buffer kept across calls
  (:mod:`slipstream.ops.kernels.scratch`) rather than zeroed per call: each fused launch zeroes the
  other half, which the next fused launch counts in.
* two passes: one launch writes the partials; a second launch reads the input again (from L2 where
  it still fits: it walks the tiles backwards, so the last ones read come first) and each of its
  programs combines its set's partials itself. No barrier: what Triton's CPU interpreter (which
  runs programs one after another) and sets too large for the GPU's barrier use, and what the GPU
  uses where the inputs are small enough (``TWO_PASS_MAX_BYTES``).
* three passes, for sets of more than ``TWO_PASS_MAX_SET`` programs (every program reading all the
  partials would cost more than a launch): a combine launch between the two passes writes each set's
  statistics once.

Either way the result is deterministic: partial sums are combined in a fixed order, never by atomics.
Forward statistics combine (count, sum, sum of squared deviations) per tile with Chan's formula, so
a large mean does not cancel the variance. Backward writes per-channel partial sums of
``dy'`` and ``dy' * xhat`` (``dy'`` is dy through SiLU's derivative when fused), which give dB and
dW after a plain ``torch.sum`` and the group terms of dx after the barrier.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from slipstream.ops._backend import interpreting
from slipstream.ops._triton_op import launch_keyed, launcher
from slipstream.ops.kernels.host_math import cdiv, launch_key, next_power_of_2
from slipstream.ops.kernels.scratch import barrier_words, discard_barrier_words, scratch

__all__ = ["forward", "backward", "TileShape", "tile_shape"]

# Elements per tile: forward keeps x in registers, backward keeps x and dy. Half and double these
# were within 2% of them on the H200 (`benchmarks/group_norm.py --sweep-setting`, docs/benchmarks.md).
FORWARD_TILE = 8192
BACKWARD_TILE = 4096
# Elements each thread holds; sets the warps per program. This and the next two constants are the
# fastest of the settings `benchmarks/group_norm.py --sweep` tried on an H100; on the H200 it chose the
# same threads, and LAST_COMBINE_MIN_PARTIALS 512 within 0.2% of its best ("never").
ELEMENTS_PER_THREAD = 64
# Partials a program reads per step when combining a set.
COMBINE_BLOCK = 128
# Fused launch: from this many partial values per set (programs x groups per tile) on, the last
# program of a set to arrive combines them and the others wait for its result; below, every program
# combines them itself (one memory round trip less, K x more reads).
LAST_COMBINE_MIN_PARTIALS = 512
# Shortest contiguous run (bytes) a tile reads from each row of a channels_last tensor.
MIN_RUN_BYTES = 64
# A pass whose inputs (x forward; x and dy backward) are at most this many bytes runs as two passes
# rather than a fused launch (see the module docstring). 0: fused wherever the barrier fits. On the
# H200 (`benchmarks/group_norm.py --sweep`) two passes up to 22.5 MiB took 1.5% less GPU time over
# the benchmark's cases, but they add a second kernel launch exactly on the small tensors whose
# training steps are host-bound, so the default stays fused.
TWO_PASS_MAX_BYTES = 0
# Largest set whose programs each combine all its partials in a two-pass launch.
TWO_PASS_MAX_SET = 256


# ----------------------------------------------------------------------------------------------------
# Shared device helpers. NCHW tiles are 3D (groups, channels, positions); channels_last tiles are 2D
# (positions, CW channels), channel ``j`` of a tile belonging to the tile's group ``j // CG`` (see
# the module docstring). Either way the fastest-varying tile axis is contiguous in memory.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _program_id(SYNC, USE_TICKET: tl.constexpr, REVERSE: tl.constexpr):
    # Fused launches number programs by arrival (an atomic ticket), not by hardware start order.
    # A second pass over the input walks the tiles backwards: the first pass read the last tiles
    # last, so those are the ones still in L2.
    if USE_TICKET:
        vid = tl.atomic_add(SYNC, 1, sem="relaxed")  # word 0: the ticket
    elif REVERSE:
        vid = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        vid = tl.program_id(0)
    return vid


@triton.jit
def _chunk_count(kc, ks, CG: tl.constexpr, S, CB: tl.constexpr, SB: tl.constexpr):
    """Valid elements per group in the tile at channel chunk ``kc`` and position chunk ``ks``."""
    return tl.minimum(CB, CG - kc * CB) * tl.minimum(SB, S - ks * SB)


@triton.jit
def _tile_index(vid, K, n_gblocks, n_schunks, G, CG: tl.constexpr, S, GB: tl.constexpr, CB: tl.constexpr,
                SB: tl.constexpr, CW: tl.constexpr, CL: tl.constexpr, CMASK: tl.constexpr,
                GMASK: tl.constexpr):
    """Where program ``vid`` works: its set, sample, groups, chunk ids, tile channels and their mask,
    positions, the tile's mask, and (channels_last) which of the tile's groups each channel is in."""
    set_id = vid // K
    k = vid % K
    n = set_id // n_gblocks
    gblock = set_id % n_gblocks
    kc = k // n_schunks
    ks = k % n_schunks
    g = gblock * GB + tl.arange(0, GB)
    s = ks * SB + tl.arange(0, SB)
    smask = s < S
    if CL:
        j = kc * CB + tl.arange(0, CW)  # channel offset from the first channel of the tile's groups
        c = gblock * GB * CG + j
        cmask = tl.full([CW], 1, tl.int1)  # constant where possible: keeps loads vectorized
        if CMASK:
            cmask = cmask & (j < GB * CG)
        if GMASK:
            cmask = cmask & (gblock * GB + j // CG < G)
        onehot = (j[None, :] // CG) == tl.arange(0, GB)[:, None]  # (GB, CW): channel j is in group i
        mask = smask[:, None] & cmask[None, :]
    else:
        cc = kc * CB + tl.arange(0, CB)
        c = g[:, None] * CG + cc[None, :]  # (GB, CB) channel index
        cmask = tl.full([GB, CB], 1, tl.int1)
        if CMASK:
            cmask = cmask & (cc[None, :] < CG)
        if GMASK:
            cmask = cmask & (g[:, None] < G)
        onehot = cmask  # unused: NCHW tiles keep groups on an axis of their own
        mask = cmask[:, :, None] & smask[None, None, :]
    return set_id, k, n, g, kc, ks, c, cmask, onehot, s, mask


@triton.jit
def _offsets(n, c, s, stride_n, stride_c, stride_s, CL: tl.constexpr):
    """64-bit element offsets of a tile in a tensor with (N, C, S) strides."""
    base = n.to(tl.int64) * stride_n
    c_off = c.to(tl.int64) * stride_c
    s_off = s.to(tl.int64) * stride_s
    if CL:
        offs = base + s_off[:, None] + c_off[None, :]
    else:
        offs = base + c_off[:, :, None] + s_off[None, None, :]
    return offs


@triton.jit
def _per_group(v, onehot, GB: tl.constexpr, CG: tl.constexpr, CW: tl.constexpr, CL: tl.constexpr):
    """Broadcast a (GB,) vector over a tile."""
    if CL:
        if CW == GB * CG:  # rows of whole groups, no padding: each group's value repeated CG times
            out = tl.reshape(tl.broadcast_to(v[:, None], (GB, CG)), (CW,))[None, :]
        else:  # through the one-hot mask: O(GB x CW) work, wasteful only for many groups
            out = tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)[None, :]
    else:
        out = v[:, None, None]
    return out


@triton.jit
def _per_channel(v, CL: tl.constexpr):
    """Broadcast a per-channel vector ((CW,) or (GB, CB), like the tile's channel index) over a tile."""
    if CL:
        out = v[None, :]
    else:
        out = v[:, :, None]
    return out


@triton.jit
def _channel_sum(t, CL: tl.constexpr):
    """Sum a tile over positions, per channel."""
    if CL:
        out = tl.sum(t, axis=0)
    else:
        out = tl.sum(t, axis=2)
    return out


@triton.jit
def _group_sum(v, onehot, GB: tl.constexpr, CG: tl.constexpr, CW: tl.constexpr, CL: tl.constexpr):
    """Sum a per-channel vector over each of the tile's groups: (GB,)."""
    if CL:
        if CW == GB * CG:
            out = tl.sum(tl.reshape(v, (GB, CG)), axis=1)
        else:
            out = tl.sum(tl.where(onehot, v[None, :], 0.0), axis=1)
    else:
        out = tl.sum(v, axis=1)
    return out


@triton.jit
def _affine(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel weight and bias of a tile in fp32 (ones and zeros when absent)."""
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
def _reduce_set(part, K, n_schunks, CG: tl.constexpr, S, eps,
                GB: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr, FORWARD: tl.constexpr):
    """Combine a set's K tile partials, in a fixed order and one pass, into two per-group values.

    ``part`` points at the set's partials, laid out (K, 2, GB). Forward: rows are (sum, sum of squared
    deviations from the tile mean); blocks of KB tiles merge by Chan's formula into (mean, rstd).
    Backward: rows are (sum w*dy', sum w*dy'*xhat) and the result is their means over the group.
    """
    j = tl.arange(0, GB)
    count_acc = tl.full([], 0.0, tl.float32)
    acc0 = tl.zeros([GB], tl.float32)  # forward: mean so far; backward: first sum
    acc1 = tl.zeros([GB], tl.float32)  # forward: squared deviations so far; backward: second sum
    for k0 in range(0, K, KB):
        kk = k0 + tl.arange(0, KB)
        kmask = kk[:, None] < K
        row = part + kk[:, None] * (2 * GB) + j[None, :]
        first = tl.load(row, mask=kmask, other=0.0, cache_modifier=".cg")
        second = tl.load(row + GB, mask=kmask, other=0.0, cache_modifier=".cg")
        if FORWARD:
            count = tl.where(kk < K, _chunk_count(kk // n_schunks, kk % n_schunks, CG, S, CB, SB), 0).to(tl.float32)
            block_count = tl.sum(count, axis=0)
            block_mean = tl.sum(first, axis=0) / block_count
            shift = first / tl.maximum(count, 1.0)[:, None] - block_mean[None, :]
            block_m2 = tl.sum(second + count[:, None] * shift * shift, axis=0)
            total = count_acc + block_count
            delta = block_mean - acc0
            acc0 += delta * (block_count / total)
            acc1 += block_m2 + delta * delta * (count_acc * block_count / total)
            count_acc = total
        else:
            acc0 += tl.sum(first, axis=0)
            acc1 += tl.sum(second, axis=0)
    if FORWARD:
        out0 = acc0
        out1 = 1.0 / tl.sqrt(acc1 / count_acc + eps)
    else:
        out0 = acc0 / (CG * 1.0 * S)
        out1 = acc1 / (CG * 1.0 * S)
    return out0, out1


@triton.jit
def _clear_for_next_launch(SYNC_NEXT, words, BLOCK: tl.constexpr = 128):
    """Zero this program's share of the barrier words the next fused launch on this stream will use."""
    for start in range(tl.program_id(0) * BLOCK, words, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(SYNC_NEXT + offs, tl.zeros([BLOCK], tl.int32), mask=offs < words)


@triton.jit
def _set_values(part, OUT0, OUT1, SYNC, set_id, k, K, g, G, n_schunks, CG: tl.constexpr, S, eps,
                GB: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr,
                FORWARD: tl.constexpr, WAIT: tl.constexpr, LAST: tl.constexpr, COMBINE: tl.constexpr):
    """A set's two per-group values, also stored at ``OUT0/OUT1 + g``.

    Fused launch (WAIT): every program has written its partials; with LAST the program that arrives
    last combines them and raises the set's flag while the others wait for it, else all wait for the
    count to reach K and combine them alike. The set's counter is word ``1 + 2 * set_id`` of
    ``SYNC`` and its flag the next one. Two-pass apply launch (COMBINE): the partials are all written
    by the launch before, and every program combines them itself. Three-pass apply launch: read what
    the combine launch stored.
    """
    gmask = g < G
    counter = SYNC + 1 + 2 * set_id
    flag = counter + 1
    if WAIT and LAST:
        tl.debug_barrier()  # every thread's partial stores are issued before the release below
        arrived = tl.atomic_add(counter, 1, sem="acq_rel") + 1
        if arrived == K:
            v0, v1 = _reduce_set(part, K, n_schunks, CG, S, eps, GB, CB, SB, KB, FORWARD)
            tl.store(OUT0 + g, v0, mask=gmask)
            tl.store(OUT1 + g, v1, mask=gmask)
            tl.debug_barrier()
            tl.atomic_xchg(flag, 1, sem="release")
        else:
            ready = tl.atomic_add(flag, 0, sem="acquire")
            while ready == 0:
                ready = tl.atomic_add(flag, 0, sem="acquire")
            tl.debug_barrier()
            v0 = tl.load(OUT0 + g, mask=gmask, other=0.0, cache_modifier=".cg")
            v1 = tl.load(OUT1 + g, mask=gmask, other=0.0, cache_modifier=".cg")
    elif WAIT or COMBINE:
        if WAIT:
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel") + 1
            while arrived < K:
                arrived = tl.atomic_add(counter, 0, sem="acquire")
            tl.debug_barrier()
        v0, v1 = _reduce_set(part, K, n_schunks, CG, S, eps, GB, CB, SB, KB, FORWARD)
        if k == 0:
            tl.store(OUT0 + g, v0, mask=gmask)
            tl.store(OUT1 + g, v1, mask=gmask)
    else:
        v0 = tl.load(OUT0 + g, mask=gmask, other=0.0)
        v1 = tl.load(OUT1 + g, mask=gmask, other=0.0)
    return v0, v1


@triton.jit
def _combine_kernel(PART, OUT0, OUT1, K, n_gblocks, n_schunks, G, S, eps, CG: tl.constexpr,
                    GB: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr,
                    FORWARD: tl.constexpr):
    """Three-launch path, middle launch: one program per set writes its groups' two values."""
    set_id = tl.program_id(0)
    v0, v1 = _reduce_set(PART + set_id * K * 2 * GB, K, n_schunks, CG, S, eps, GB, CB, SB, KB, FORWARD)
    n = set_id // n_gblocks
    g = (set_id % n_gblocks) * GB + tl.arange(0, GB)
    tl.store(OUT0 + n * G + g, v0, mask=g < G)
    tl.store(OUT1 + n * G + g, v1, mask=g < G)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sync_words"])  # grows with the buffer: one compiled kernel for all sizes
def _forward_kernel(
    X, Y, W, B, MEAN, RSTD, PART, SYNC, SYNC_NEXT, sync_words,
    G, S, n_gblocks, n_schunks, K,
    sxn, sxc, sxs, syn, syc, sys_, eps,
    CG: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, CW: tl.constexpr, KB: tl.constexpr,
    CL: tl.constexpr, CMASK: tl.constexpr, GMASK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    STATS: tl.constexpr, APPLY: tl.constexpr, WAIT: tl.constexpr, LAST: tl.constexpr, COMBINE: tl.constexpr,
):
    if WAIT:
        _clear_for_next_launch(SYNC_NEXT, sync_words)
    vid = _program_id(SYNC, WAIT, APPLY and not STATS)
    set_id, k, n, g, kc, ks, c, cmask, onehot, s, mask = _tile_index(vid, K, n_gblocks, n_schunks, G, CG, S, GB, CB,
                                                                     SB, CW, CL, CMASK, GMASK)
    part = PART + set_id * K * 2 * GB
    x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, CL), mask=mask, other=0.0).to(tl.float32)
    if STATS:
        count = _chunk_count(kc, ks, CG, S, CB, SB).to(tl.float32)
        tile_sum = _group_sum(_channel_sum(x, CL), onehot, GB, CG, CW, CL)
        dev = tl.where(mask, x - _per_group(tile_sum / count, onehot, GB, CG, CW, CL), 0.0)
        tile_m2 = _group_sum(_channel_sum(dev * dev, CL), onehot, GB, CG, CW, CL)
        if WAIT or not APPLY:  # other programs (or the combine launch) need this tile's partials
            j = tl.arange(0, GB)
            tl.store(part + k * 2 * GB + j, tile_sum)
            tl.store(part + k * 2 * GB + GB + j, tile_m2)
    if APPLY:
        if STATS and not WAIT:  # the set is this one program: statistics straight from registers
            mean = tile_sum / count
            rstd = 1.0 / tl.sqrt(tile_m2 / count + eps)
            tl.store(MEAN + n * G + g, mean, mask=g < G)
            tl.store(RSTD + n * G + g, rstd, mask=g < G)
        else:
            mean, rstd = _set_values(part, MEAN + n * G, RSTD + n * G, SYNC, set_id, k, K, g, G,
                                     n_schunks, CG, S, eps, GB, CB, SB, KB, True, WAIT, LAST, COMBINE)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        scale = _per_group(rstd, onehot, GB, CG, CW, CL) * _per_channel(w, CL)
        z = (x - _per_group(mean, onehot, GB, CG, CW, CL)) * scale + _per_channel(b, CL)
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y + _offsets(n, c, s, syn, syc, sys_, CL), z.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sync_words"])
def _backward_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SCRATCH, SYNC, SYNC_NEXT, sync_words,
    C, G, S, n_gblocks, n_schunks, K, csum_half, grad0_at, grad1_at, part_at,
    sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs,
    CG: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, CW: tl.constexpr, KB: tl.constexpr,
    CL: tl.constexpr, CMASK: tl.constexpr, GMASK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    PARAM_GRADS: tl.constexpr,
    STATS: tl.constexpr, APPLY: tl.constexpr, WAIT: tl.constexpr, LAST: tl.constexpr, COMBINE: tl.constexpr,
):
    if WAIT:
        _clear_for_next_launch(SYNC_NEXT, sync_words)
    vid = _program_id(SYNC, WAIT, APPLY and not STATS)
    set_id, k, n, g, kc, ks, c, cmask, onehot, s, mask = _tile_index(vid, K, n_gblocks, n_schunks, G, CG, S, GB, CB,
                                                                     SB, CW, CL, CMASK, GMASK)
    # SCRATCH (laid out in ``backward``): per-channel sums of dy' and of dy' * xhat, group means, partials
    part = SCRATCH + part_at + set_id * K * 2 * GB
    mean = tl.load(MEAN + n * G + g, mask=g < G, other=0.0)
    rstd = tl.load(RSTD + n * G + g, mask=g < G, other=0.0)
    w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
    x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, CL), mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + _offsets(n, c, s, sdn, sdc, sds, CL), mask=mask, other=0.0).to(tl.float32)
    rstd_t = _per_group(rstd, onehot, GB, CG, CW, CL)
    xhat = (x - _per_group(mean, onehot, GB, CG, CW, CL)) * rstd_t
    if SILU:  # d silu(z)/dz = sig(z) * (1 + z * (1 - sig(z))), with z recomputed from x
        z = xhat * _per_channel(w, CL) + _per_channel(b, CL)
        sig = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    # masked lanes hold dy = 0, so they add nothing to the sums below
    if STATS:
        sum_dy = _channel_sum(dy, CL)
        sum_dy_xhat = _channel_sum(dy * xhat, CL)
        if PARAM_GRADS:  # per (sample, position chunk, channel): summed into dB, dW afterwards
            crow = (n * n_schunks + ks).to(tl.int64) * C + c
            tl.store(SCRATCH + crow, sum_dy, mask=cmask)
            tl.store(SCRATCH + csum_half + crow, sum_dy_xhat, mask=cmask)
        group_dy = _group_sum(w * sum_dy, onehot, GB, CG, CW, CL)
        group_dy_xhat = _group_sum(w * sum_dy_xhat, onehot, GB, CG, CW, CL)
        if WAIT or not APPLY:  # other programs (or the combine launch) need this tile's partials
            j = tl.arange(0, GB)
            tl.store(part + k * 2 * GB + j, group_dy)
            tl.store(part + k * 2 * GB + GB + j, group_dy_xhat)
    if APPLY:
        if STATS and not WAIT:  # the set is this one program
            mean_g = group_dy / (CG * 1.0 * S)
            mean_gx = group_dy_xhat / (CG * 1.0 * S)
        else:
            mean_g, mean_gx = _set_values(part, SCRATCH + grad0_at + n * G, SCRATCH + grad1_at + n * G, SYNC,
                                          set_id, k, K, g, G, n_schunks, CG, S, 0.0, GB, CB, SB, KB,
                                          False, WAIT, LAST, COMBINE)
        centred = dy * _per_channel(w, CL) - _per_group(mean_g, onehot, GB, CG, CW, CL)
        dx = (centred - xhat * _per_group(mean_gx, onehot, GB, CG, CW, CL)) * rstd_t
        tl.store(DX + _offsets(n, c, s, sgn, sgc, sgs, CL), dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


class TileShape(NamedTuple):
    """Tile of ``groups`` x ``channels`` (within a group) x ``positions`` elements."""

    groups: int
    channels: int
    positions: int


def _pow2_at_most(limit: int) -> list[int]:
    return [1 << i for i in range(max(limit, 1).bit_length()) if (1 << i) <= limit]


@functools.lru_cache(maxsize=1024)
def tile_shape(num_groups: int, group_channels: int, positions: int, channels_last: bool,
               element_size: int, tile: int, max_per_set: int, min_run_bytes: int = 64) -> TileShape:
    """The tile (``tile`` elements or fewer where possible) a program of the kernels works on.

    Preference order: at most ``max_per_set`` programs per set (so the fused launch can run), a
    contiguous run in memory of at least 64 bytes (coalesced loads), then the smallest tile over
    ``tile`` elements (up to 4x) that achieves those two where none within achieves them, one program per set where a
    group fits in a tile (no barrier), else little padding (within 15% counts as none; padded lanes
    cost registers, not bandwidth), large tiles, then few programs per set (a shorter barrier and
    fewer partials to combine).

    Example:
        >>> tile_shape(32, 8, 4096, channels_last=False, element_size=2, tile=8192, max_per_set=132)
        TileShape(groups=1, channels=2, positions=4096)
    """
    cg_p2 = next_power_of_2(group_channels)
    group_fits = cg_p2 * next_power_of_2(positions) <= tile
    largest = 4 * tile
    contiguous_extent = num_groups * group_channels if channels_last else positions
    min_run = min(min_run_bytes, contiguous_extent * element_size)
    best, best_key = None, None
    for cb in _pow2_at_most(min(cg_p2, largest)):
        for sb in _pow2_at_most(min(next_power_of_2(positions), largest // cb)):
            whole_groups = cb == cg_p2
            gb_limit = min(next_power_of_2(num_groups), largest // (cb * sb)) if whole_groups else 1
            for gb in _pow2_at_most(gb_limit):
                padded = (cdiv(num_groups, gb) * gb * cdiv(group_channels, cb) * cb
                          * cdiv(positions, sb) * sb)
                waste = padded / (num_groups * group_channels * positions)
                # channels_last: whole groups side by side are one run (padding lanes are masked)
                run = (gb * group_channels if whole_groups else cb) if channels_last else sb
                per_set = cdiv(group_channels, cb) * cdiv(positions, sb)
                padding = per_set if group_fits else 0.0 if waste <= 1.15 else round(waste, 1)
                size = gb * cb * sb
                key = (per_set > max_per_set, run * element_size < min_run, max(size, tile), padding, -size, per_set)
                if best_key is None or key < best_key:
                    best, best_key = TileShape(gb, cb, sb), key
    return best


@functools.lru_cache(maxsize=None)
def _max_fused_set(device_index: int) -> int:
    """Largest set a fused launch may wait on: one program per SM always fits on the GPU at once."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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


class _Plan(NamedTuple):
    shape: TileShape
    n_gblocks: int
    n_schunks: int
    per_set: int  # K: programs per set
    num_sets: int
    # how a set's programs get the set's statistics (module docstring): "one" (a set of one program),
    # "fused" (a barrier), "two_pass" or "three_pass"
    strategy: str
    num_warps: int
    channels_last: bool
    last_combines: bool  # fused sets: the last program to arrive combines the partials
    row_channels: int  # channels_last: channels of a 2D tile's rows (CW), a power of two
    channel_mask: bool  # a tile can run past its groups' channels (CMASK)
    group_mask: bool  # a tile can run past the last group (GMASK)


def _plan(x: torch.Tensor, x_strides: tuple[int, int, int], num_groups: int, tile: int, reread_bytes: int) -> _Plan:
    """The launch plan for ``x``; ``reread_bytes``: what a second pass over the inputs would read."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    _, sxc, sxs = x_strides
    # the interpreter runs programs one at a time, so its programs can never wait at a barrier
    max_per_set = 0 if interpreting() else _max_fused_set(x.device.index or 0)
    return _cached_plan(n, c, s, sxc < sxs and c > 1 and s > 1, x.element_size(), num_groups, tile, max_per_set,
                        reread_bytes <= TWO_PASS_MAX_BYTES, TWO_PASS_MAX_SET, MIN_RUN_BYTES, ELEMENTS_PER_THREAD,
                        LAST_COMBINE_MIN_PARTIALS)


@functools.lru_cache(maxsize=4096)
def _cached_plan(n: int, c: int, s: int, channels_last: bool, element_size: int, num_groups: int, tile: int,
                 max_per_set: int, prefer_two_pass: bool, two_pass_max_set: int, min_run_bytes: int,
                 elements_per_thread: int, last_min_partials: int) -> _Plan:
    cg = c // num_groups
    shape = tile_shape(num_groups, cg, s, channels_last, element_size, tile, max_per_set or cg * s, min_run_bytes)
    n_gblocks = cdiv(num_groups, shape.groups)
    n_schunks = cdiv(s, shape.positions)
    per_set = cdiv(cg, shape.channels) * n_schunks
    if per_set == 1:
        strategy = "one"
    elif per_set <= max_per_set and not prefer_two_pass:
        strategy = "fused"
    else:
        strategy = "two_pass" if per_set <= two_pass_max_set else "three_pass"
    elements = shape.groups * shape.channels * shape.positions
    num_warps = max(1, min(16, elements // (32 * elements_per_thread)))
    last_combines = per_set * shape.groups >= last_min_partials
    row_channels = next_power_of_2(shape.groups * min(shape.channels, cg))
    channel_mask = shape.channels > cg or cg % shape.channels != 0
    return _Plan(shape, n_gblocks, n_schunks, per_set, n * n_gblocks, strategy, num_warps, channels_last,
                 last_combines, row_channels, channel_mask, num_groups % shape.groups != 0)


def _barrier_words(plan: _Plan, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The launch's barrier words (the ticket, then a counter and a flag per set), the words it zeroes
    for the next fused launch, and how many; without a barrier, ``placeholder`` (never read) twice."""
    if plan.strategy != "fused":
        return placeholder, placeholder, 0
    words, next_words = barrier_words(placeholder.device, 1 + 2 * plan.num_sets)
    return words, next_words, next_words.numel()


def _lose_barrier_turn(x: torch.Tensor, plan: _Plan) -> None:
    """After a launch failed (a kernel that does not compile): a fused launch's turn of the barrier
    words is lost, and the words the next launch would count in were never zeroed, so drop them."""
    if plan.strategy == "fused":
        discard_barrier_words(x.device)


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def _phases(plan: _Plan) -> list[tuple[bool, bool, bool, bool]]:
    """(STATS, APPLY, WAIT, COMBINE) of each launch; a combine launch runs between three-pass phases."""
    if plan.strategy in ("one", "fused"):
        return [(True, True, plan.strategy == "fused", False)]
    return [(True, False, False, False), (False, True, False, plan.strategy == "two_pass")]


class _Step(NamedTuple):
    """One kernel launch of a configuration: everything but its tensors, memoized, and the memo's key."""

    grid: tuple[int]
    scalars: tuple  # the kernel's positional arguments after its tensors
    meta: dict  # constexprs and launch options
    key: int  # unique to this memo (see ``CachedLauncher.launch_keyed``)


def _steps(plan: _Plan, scalars: tuple, constexprs: dict) -> tuple[_Step, ...]:
    """The launches of ``plan`` (one per phase) sharing ``scalars`` and ``constexprs``."""
    t = plan.shape
    shared = dict(constexprs, GB=t.groups, CB=t.channels, SB=t.positions, CW=plan.row_channels,
                  KB=_combine_block(plan), CL=plan.channels_last, CMASK=plan.channel_mask, GMASK=plan.group_mask,
                  LAST=plan.last_combines, num_warps=plan.num_warps)
    return tuple(
        _Step((plan.num_sets * plan.per_set,), scalars,
              dict(shared, STATS=stats, APPLY=apply, WAIT=wait, COMBINE=combine), launch_key())
        for stats, apply, wait, combine in _phases(plan))


@functools.lru_cache(maxsize=4096)
def _forward_steps(plan: _Plan, num_groups: int, cg: int, s: int, x_strides: tuple[int, int, int],
                   y_strides: tuple[int, int, int], eps: float, has_w: bool, has_b: bool,
                   silu: bool) -> tuple[_Step, ...]:
    scalars = (num_groups, s, plan.n_gblocks, plan.n_schunks, plan.per_set, *x_strides, *y_strides, eps)
    return _steps(plan, scalars, dict(CG=cg, HAS_W=has_w, HAS_B=has_b, SILU=silu))


@functools.lru_cache(maxsize=4096)
def _backward_steps(plan: _Plan, num_groups: int, c: int, s: int, strides: tuple[int, ...],
                    scratch_at: tuple[int, int, int, int], has_w: bool, has_b: bool,
                    silu: bool) -> tuple[_Step, ...]:
    scalars = (c, num_groups, s, plan.n_gblocks, plan.n_schunks, plan.per_set, *scratch_at, *strides)
    return _steps(plan, scalars, dict(CG=c // num_groups, HAS_W=has_w, HAS_B=has_b, SILU=silu,
                                      PARAM_GRADS=has_w or has_b))


def _combine(part: torch.Tensor, out0: torch.Tensor, out1: torch.Tensor, plan: _Plan, num_groups: int,
             cg: int, s: int, eps: float, forward: bool) -> None:
    tile = plan.shape
    launcher(False)(_combine_kernel)[(plan.num_sets,)](
        part, out0, out1, plan.per_set, plan.n_gblocks, plan.n_schunks, num_groups, s, eps, CG=cg,
        GB=tile.groups, CB=tile.channels, SB=tile.positions, KB=COMBINE_BLOCK, FORWARD=forward,
    )


def _partials(plan: _Plan) -> int:
    """fp32 values of the tile partials, (num_sets, K, 2, GB)."""
    return plan.num_sets * plan.per_set * 2 * plan.shape.groups


def _combine_block(plan: _Plan) -> int:
    return min(COMBINE_BLOCK, next_power_of_2(plan.per_set))


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

    ``y`` has ``x``'s shape and memory layout and dtype ``out_dtype``. ``tile`` bounds the elements per
    program (default ``FORWARD_TILE``, read at call time; tests shrink it to exercise multi-program
    sets on small inputs).
    """
    x, x_strides = _flattened(x)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    cg = c // num_groups
    y = torch.empty_like(x, dtype=out_dtype)
    y_strides = _ncs_strides(y)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    plan = _plan(x, x_strides, num_groups, tile or FORWARD_TILE, x.numel() * x.element_size())
    has_w, has_b = weight is not None, bias is not None
    steps = _forward_steps(plan, num_groups, cg, s, x_strides, y_strides, eps, has_w, has_b, silu)
    part = scratch(x.device, _partials(plan))
    # the arguments that change from call to call: tensors, and the barrier buffer's size (not specialized on)
    per_call = (x, y, weight if has_w else x, bias if has_b else x, mean, rstd, part, *_barrier_words(plan, part))
    try:  # (free when nothing is raised, unlike a context manager)
        for launch, step in enumerate(steps):
            if launch == 1 and plan.strategy == "three_pass":
                _combine(part, mean, rstd, plan, num_groups, cg, s, eps, forward=True)
            launch_keyed(_forward_kernel, step.grid, step.key, per_call + step.scalars, step.meta)
    except BaseException:
        _lose_barrier_turn(x, plan)
        raise
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

    ``dweight``/``dbias`` are None when ``weight``/``bias`` is None; ``tile`` defaults to ``BACKWARD_TILE``.
    """
    x, x_strides = _flattened(x)
    dy, dy_strides = _flattened(dy)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    cg = c // num_groups
    dx = torch.empty_like(x)
    dx_strides = _ncs_strides(dx)
    plan = _plan(x, x_strides, num_groups, tile or BACKWARD_TILE, 2 * x.numel() * x.element_size())
    has_w, has_b = weight is not None, bias is not None
    param_grads = has_w or has_b
    # scratch: per-channel sums of dy' and of dy'*xhat for each (sample, position chunk), (2, N, n_schunks, C);
    # the per-group means of w*dy' and w*dy'*xhat (2, N, G) where a set's programs exchange them; partials
    csum_half = n * plan.n_schunks * c if param_grads else 0
    grad0_at = _round16(2 * csum_half)
    grad1_at = grad0_at + n * num_groups
    part_at = _round16(grad1_at + n * num_groups)
    steps = _backward_steps(plan, num_groups, c, s, (*x_strides, *dy_strides, *dx_strides),
                            (csum_half, grad0_at, grad1_at, part_at), has_w, has_b, silu)
    work = scratch(x.device, part_at + _partials(plan))
    per_call = (x, dy, dx, weight if has_w else x, bias if has_b else x, mean, rstd, work,
                *_barrier_words(plan, work))
    try:
        for launch, step in enumerate(steps):
            if launch == 1 and plan.strategy == "three_pass":
                _combine(work[part_at:], work[grad0_at:], work[grad1_at:], plan, num_groups, cg, s, 0.0,
                         forward=False)
            launch_keyed(_backward_kernel, step.grid, step.key, per_call + step.scalars, step.meta)
    except BaseException:
        _lose_barrier_turn(x, plan)
        raise
    if not param_grads:
        return dx, None, None
    # One fixed-order reduction for both (deterministic; one launch less than two). dweight and dbias
    # may be views of one buffer: callers whose outputs must not alias (a custom op) copy one.
    csums = work.as_strided((2, n * plan.n_schunks, c), (csum_half, c, 1))
    dbias_sum, dweight_sum = csums.sum(dim=1).unbind()
    dweight = dweight_sum.to(weight.dtype) if weight is not None else None
    dbias = dbias_sum.to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
