"""Host Python time of slipstream's eager ops on a machine without a GPU, kernel launches stubbed out.

``benchmarks/host_overhead.py`` measures host time on the GPU machine, where device time is scarce.
This measures the part of it that is our own Python, on any CPU: each op's eager path runs as it
would on CUDA (argument checks, autograd Function, launcher arithmetic, allocations, the cached
launcher's signature lookup), except that the compiled kernel's launcher does nothing. Inputs are
CPU tensors of a GPT-2-small activation (8 x 512 x 768 bf16) and a GroupNorm image
(8 x 256 x 32 x 32 channels_last). Each op forward, and forward + backward through
``torch.autograd.grad`` (gradients are returned, not accumulated into ``.grad``: that accumulation
is an asynchronous kernel on CUDA but arithmetic on a CPU); then the modules surgery puts into
models (FusedLayerNorm, SeededDropout, FusedGroupNorm), forward + backward. The backward's own ``torch.sum`` of the
parameter gradients does run on the CPU here, on real sizes, so the forward + backward numbers
overstate the host time by that sum.

Run (repo root, no GPU needed): ``PYTHONPATH=. python benchmarks/host_python_cpu.py [--profile NAME]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from typing import Callable, Optional, Sequence

import torch

CALLS = 500


class _CompiledStub:
    """What a Triton launch hands back, with a launcher that does nothing."""

    function = 0
    packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        pass

    def _init_handles(self) -> None:
        pass


class _KernelStub:
    """A jitted kernel's signature, whose launches compile nothing."""

    def __init__(self, kernel) -> None:
        self.signature, self.constexprs, self.arg_names = kernel.signature, kernel.constexprs, kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _CompiledStub()


def stub_launches() -> None:
    """Make every slipstream op take its kernel path on CPU tensors; launches go through the real
    :class:`~slipstream.ops.kernels.cached_launch.CachedLauncher` up to the compiled kernel's launcher,
    which does nothing."""
    from slipstream.ops import _triton_op
    from slipstream.ops.kernels import group_norm as group_norm_kernels
    from slipstream.ops.kernels.cached_launch import CachedLauncher

    always = lambda x: True  # noqa: E731
    for name in ("layer_norm", "dropout", "group_norm"):
        sys.modules[f"slipstream.ops.{name}"].use_triton = always
    _triton_op.use_triton = always
    _triton_op.interpreting = lambda: False
    launchers: dict = {}

    def cached(kernel):  # keyed by id, as cached_launcher is
        launcher = launchers.get(id(kernel))
        if launcher is None:
            launcher = launchers[id(kernel)] = CachedLauncher(_KernelStub(kernel), stream_of=lambda device: 0)
        return launcher

    _triton_op._cached = cached
    torch.cuda.current_device = lambda: 0
    group_norm_kernels.interpreting = lambda: False
    group_norm_kernels._max_fused_set = lambda device_index: 132  # an H100's SM count


def _forward_backward(op: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], object]:
    """Forward, then gradients of every input by ``torch.autograd.grad`` (no accumulation into ``.grad``)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    dy = torch.randn_like(op(*leaves))
    return lambda: torch.autograd.grad(op(*leaves), leaves, dy)


def cases() -> dict[str, Callable[[], object]]:
    from slipstream.nn import FusedGroupNorm, FusedLayerNorm, SeededDropout
    from slipstream.ops import group_norm, layer_norm, seeded_dropout

    x = torch.randn(8, 512, 768, dtype=torch.bfloat16)
    w, b = torch.randn(768, dtype=torch.bfloat16), torch.randn(768, dtype=torch.bfloat16)
    image = torch.randn(8, 256, 32, 32, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    gw, gb = torch.randn(256, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16)
    ops = {
        "layer_norm": (lambda t, w_, b_: layer_norm(t, (768,), w_, b_), x, w, b),
        "dropout": (lambda t: seeded_dropout(t, 0.1, 1234), x),
        "group_norm": (lambda t, w_, b_: group_norm(t, 32, w_, b_), image, gw, gb),
    }
    timed = {}
    for name, (op, *inputs) in ops.items():
        timed[f"{name} forward"] = lambda op=op, inputs=inputs: op(*inputs)
        timed[f"{name} forward+backward"] = _forward_backward(op, *inputs)
    # What models run: the modules surgery puts in, their parameters as gradient leaves.
    modules = {
        "FusedLayerNorm": (FusedLayerNorm(768).to(torch.bfloat16), x),
        "SeededDropout": (SeededDropout(0.1, seed=0), x),
        "FusedGroupNorm": (FusedGroupNorm(32, 256).to(torch.bfloat16), image),
    }
    for name, (module, inp) in modules.items():
        leaves = [inp.detach().requires_grad_(), *module.parameters()]
        dy = torch.randn_like(module(inp))
        timed[f"{name} module forward+backward"] = (
            lambda module=module, leaves=leaves, dy=dy: torch.autograd.grad(module(leaves[0]), leaves, dy))
    return timed


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="also print a cProfile of this case, e.g. 'group_norm forward'")
    args = parser.parse_args(argv)
    from slipstream.ops._backend import interpreting

    if interpreting():
        raise SystemExit("host_python_cpu.py times jitted kernels' launch path: run it without TRITON_INTERPRET=1")
    stub_launches()
    table = cases()
    for name, fn in table.items():
        for _ in range(50):
            fn()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        print(f"{name}: {(time.perf_counter() - start) / CALLS * 1e6:.1f} us per call")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            table[args.profile]()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
