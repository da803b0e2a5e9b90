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

from benchmarks.common import Table, command_line, environment_line, write_section
from slipstream.ops import layer_norm, seeded_dropout

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


def _cases(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    n = x.shape[-1]
    ours_ln = lambda t: layer_norm(t, (n,), w, b)  # noqa: E731
    torch_ln = lambda t: F.layer_norm(t, (n,), w, b)  # noqa: E731
    ours_drop = lambda t: seeded_dropout(t, 0.1, 1234)  # noqa: E731
    torch_drop = lambda t: F.dropout(t, 0.1, training=True)  # noqa: E731
    return {"layer_norm": (torch_ln, ours_ln), "dropout": (torch_drop, ours_drop)}


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


def parts(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> str:
    """Host microseconds of the pieces our eager LayerNorm and dropout are made of."""
    from slipstream.ops.kernels import layer_norm as ln_kernels
    from slipstream.ops.kernels.dropout import launch_seeded_dropout

    xd, wd, bd = x.detach(), w.detach(), b.detach()
    _, stats = ln_kernels.forward(xd, wd, bd, 1e-5, xd.dtype)
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
    dy = torch.randn_like(x)
    table = Table(["op", "pass", "torch us/call", "slipstream us/call", "ratio"])
    profiles = []
    for name, (theirs, ours) in _cases(x, w, b).items():
        for label, make in (("forward", lambda op: (lambda: op(x.detach()))),
                            ("forward+backward", lambda op: _forward_backward(op, x, dy))):
            t, o = host_us_per_call(make(theirs)), host_us_per_call(make(ours))
            table.add(name, label, f"{t:.1f}", f"{o:.1f}", f"{o / t:.2f}x")
        profiles.append(f"#### {name}, forward+backward, cProfile of 100 calls\n\n```\n"
                        f"{profile_top(_forward_backward(ours, x, dy))}```")
    body = table.markdown()
    if with_parts:
        body += "\n\nPieces, each called on its own:\n\n" + parts(x, w, b, dy)
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
