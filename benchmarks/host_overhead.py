"""Host (CPU) time per call of slipstream's eager ops against PyTorch's, and where ours goes.

A training step is host-bound when Python and launch costs exceed the GPU time of its kernels, so
per-call host time decides whether a fused kernel helps a real model in eager mode. For each op, at
a GPT-2-small activation size (8 x 512 x 768, bf16), this enqueues many calls with no
synchronization and divides the wall time by the count: forward alone, and forward + backward. Then
the same for the pieces our ops are made of (an allocation, a view, an empty autograd Function, our
launchers called directly), and cProfile lists the Python functions our forward + backward spends
its time in (the backward's own Python runs on the autograd engine's device thread, which cProfile
does not see: it shows up as ``run_backward``'s own time).

Run (repo root, on a CUDA machine)::

    PYTHONPATH=. python benchmarks/host_overhead.py --out $OUT/host_overhead.md
    PYTHONPATH=old:. python benchmarks/host_overhead.py --no-parts   # an older slipstream unpacked in old/
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.common import Table, command_line, eager_launch, environment_line, write_section
from slipstream.ops import group_norm, layer_norm, seeded_dropout, seeded_dropout_rows, sparse_jl

CALLS = 300


def host_us_per_call(fn: Callable[[], object], calls: int = CALLS) -> float:
    """Median over 5 repeats of wall microseconds per call, ``calls`` calls enqueued without a sync."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(samples)[len(samples) // 2]


def _cases(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
           image: torch.Tensor) -> dict[str, tuple[Callable, Callable, torch.Tensor]]:
    """Per op: (torch's call, ours, its input)."""
    n, c = x.shape[-1], image.shape[1]
    gw, gb = w[:c], b[:c]
    return {
        "layer_norm": (lambda t: F.layer_norm(t, (n,), w, b), lambda t: layer_norm(t, (n,), w, b), x),
        "dropout": (lambda t: F.dropout(t, 0.1, training=True), lambda t: seeded_dropout(t, 0.1, 1234), x),
        "group_norm": (lambda t: F.group_norm(t, 32, gw, gb), lambda t: group_norm(t, 32, gw, gb), image),
    }


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in memory that starts one element past a 16-byte boundary, same strides."""
    base = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)[1:]
    return base.view(t.shape).copy_(t) if t.is_contiguous() else base.as_strided(t.shape, t.stride()).copy_(t)


def check_cached_launches() -> str:
    """Every op's outputs and gradients through cached launches equal Triton's own launches, bit for bit.

    Both modes run the same compiled kernels on the same values, so any difference is a launch that
    reached the wrong kernel or arguments. Each input comes aligned and misaligned (another
    specialization), and each is launched several times, so later calls take the cached path.
    """
    torch.manual_seed(0)
    cases = {
        "layer_norm bf16 3x5x768": (lambda t: layer_norm(t, (768,)), torch.randn(3, 5, 768, dtype=torch.bfloat16)),
        "layer_norm fp32 7x1537": (lambda t: layer_norm(t, (1537,)), torch.randn(7, 1537)),
        "layer_norm bf16 3x20000 (looped, column-tiled)": (lambda t: layer_norm(t, (20000,)),
                                                           torch.randn(3, 20000, dtype=torch.bfloat16)),
        "dropout bf16 1000x33": (lambda t: seeded_dropout(t, 0.3, 99), torch.randn(1000, 33, dtype=torch.bfloat16)),
        "dropout rows fp32 64x100 transposed": (
            lambda t: seeded_dropout_rows(t, 0.5, torch.arange(t.shape[0], device=t.device) * 7 + 1),
            torch.randn(100, 64).t()),
        "group_norm bf16 4x96x7x9 channels_last": (
            lambda t: group_norm(t, 8, activation="silu"),
            torch.randn(4, 96, 7, 9, dtype=torch.bfloat16).to(memory_format=torch.channels_last)),
        "sparse_jl fp32 50x300 -> 64": (lambda t: sparse_jl(t, 64, 11), torch.randn(50, 300)),
    }
    table = Table(["case", "input", "calls", "outputs and gradients equal"])
    for name, (op, cpu_input) in cases.items():
        for layout, make in (("aligned", lambda t: t.clone()), ("misaligned", _misaligned_copy)):
            values = cpu_input.cuda()
            results = {}
            for mode in ("triton", "cached"):
                with eager_launch(mode):
                    for _ in range(3):
                        x = make(values).requires_grad_()
                        y = op(x)
                        y.backward(torch.ones_like(y))
                        results.setdefault(mode, []).append((y.detach(), x.grad))
            equal = all(torch.equal(a, b) for (ya, ga), (yb, gb) in zip(results["triton"], results["cached"])
                        for a, b in ((ya, yb), (ga, gb)))
            table.add(name, layout, 3, "yes" if equal else "**NO**")
            if not equal:
                raise SystemExit(f"cached launch differs from Triton's: {name}, {layout}\n" + table.markdown())
    return table.markdown()


def _forward_backward(op: Callable, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        op(x).backward(dy)

    return run


def profile_top(fn: Callable[[], None], calls: int = 100, top: int = 25) -> str:
    """cProfile of ``calls`` calls of ``fn``: the ``top`` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


class _Identity(torch.autograd.Function):
    """The cheapest Python autograd Function: what the machinery alone costs per call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _chain(x: torch.Tensor, length: int) -> torch.Tensor:
    for _ in range(length):
        x = _Identity.apply(x)
    return x


def parts(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, image: torch.Tensor) -> str:
    """Host microseconds of the pieces our eager LayerNorm, dropout and GroupNorm are made of."""
    from slipstream.ops.kernels import group_norm as gn_kernels
    from slipstream.ops.kernels import layer_norm as ln_kernels
    from slipstream.ops.kernels.dropout import launch_seeded_dropout
    from slipstream.ops.kernels.scratch import barrier_words, scratch

    xd, wd, bd = x.detach(), w.detach(), b.detach()
    _, stats = ln_kernels.forward(xd, wd, bd, 1e-5, xd.dtype)
    img, gw, gb = image.detach(), wd[:image.shape[1]], bd[:image.shape[1]]
    _, mean, rstd = gn_kernels.forward(img, gw, gb, 32, 1e-5, False, img.dtype)
    dimg = torch.randn_like(img)
    out = torch.empty_like(xd)
    xg = xd.clone().requires_grad_()
    pieces = {
        "torch.empty((2, 4096)) on CUDA": lambda: torch.empty((2, 4096), device="cuda"),
        "x.view(1, -1)": lambda: xd.view(1, -1),
        "identity autograd.Function, forward+backward": lambda: _Identity.apply(xg).backward(dy),
        # Ten in one graph, divided by ten below: a node's own cost, without starting a backward pass.
        "identity autograd.Function, per node of a chain of 10": lambda: _chain(xg, 10).backward(dy),
        "dropout kernel launch (launch_seeded_dropout)": lambda: launch_seeded_dropout(
            xd, out, 6554, 1 / 0.9, seed=5, one_row=True),
        "LayerNorm forward launcher (2 allocations, 1 launch)": lambda: ln_kernels.forward(xd, wd, bd, 1e-5, xd.dtype),
        "LayerNorm backward launcher (2 allocations, 1 launch, 1 torch.sum)": lambda: ln_kernels.backward(
            dy, xd, wd, stats, bd.dtype),
        "GroupNorm forward launcher (kernels.forward)": lambda: gn_kernels.forward(
            img, gw, gb, 32, 1e-5, False, img.dtype),
        "GroupNorm backward launcher (kernels.backward, with dW and dB)": lambda: gn_kernels.backward(
            dimg, img, gw, gb, mean, rstd, 32, False),
        "torch.zeros(265) on CUDA (what a fused launch's barrier words cost before they were reused)":
            lambda: torch.zeros(265, device="cuda", dtype=torch.int32),
        "scratch() and barrier_words() (the reused buffers that replaced it)": lambda: (
            scratch(img.device, 4096), barrier_words(img.device, 265)),
    }
    table = Table(["piece", "us/call"])
    for name, fn in pieces.items():
        per_call = host_us_per_call(fn) / (10 if "chain of 10" in name else 1)
        table.add(name, f"{per_call:.1f}")
    return table.markdown()


def run(with_parts: bool) -> str:
    x = torch.randn(8, 512, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    image = torch.randn(8, 256, 32, 32, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    image.requires_grad_()
    table = Table(["op", "pass", "torch us/call", "slipstream, Triton launch us/call",
                   "slipstream, cached launch us/call", "ratio to torch (Triton / cached launch)"])
    profiles = []
    for name, (theirs, ours, t) in _cases(x, w, b, image).items():
        dy = torch.randn_like(t)
        for label, make in (("forward", lambda op: (lambda: op(t.detach()))),
                            ("forward+backward", lambda op: _forward_backward(op, t, dy))):
            # A-B-B-A order, mean of the two medians: this host drifts between consecutive timings
            times = {"torch": [], "triton": [], "cached": []}
            for mode in ("triton", "cached", "cached", "triton"):
                with eager_launch(mode):
                    times["torch"].append(host_us_per_call(make(theirs)))
                    times[mode].append(host_us_per_call(make(ours)))
            mean = {k: sum(v) / len(v) for k, v in times.items()}
            table.add(name, label, f"{mean['torch']:.1f}", f"{mean['triton']:.1f}", f"{mean['cached']:.1f}",
                      f"{mean['triton'] / mean['torch']:.2f}x / {mean['cached'] / mean['torch']:.2f}x")
        profiles.append(f"#### {name}, forward+backward (cached launch), cProfile of 100 calls\n\n```\n"
                        f"{profile_top(_forward_backward(ours, t, dy))}```")
    body = ("Cached launches against Triton's own, bit for bit:\n\n" + check_cached_launches()
            + "\n\nHost time per call (each number the mean of two medians, timed in A-B-B-A order):\n\n"
            + table.markdown())
    if with_parts:
        for mode in ("triton", "cached"):
            with eager_launch(mode):
                body += (f"\n\nPieces, each called on its own ({mode} launch):\n\n"
                         + parts(x, w, b, torch.randn_like(x), image))
    return body + "\n\n" + "\n\n".join(profiles)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown results here")
    parser.add_argument("--no-parts", action="store_true",
                        help="skip the table of pieces (for timing an older slipstream on PYTHONPATH)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py needs a CUDA device")
    write_section(args.out, "Host time per call, eager", environment_line(command_line()), run(not args.no_parts))


if __name__ == "__main__":
    main()
