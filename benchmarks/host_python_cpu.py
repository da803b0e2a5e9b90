"""Host Python time of slipstream's eager forwards on a machine without a GPU, kernel launches stubbed out.

``benchmarks/host_overhead.py`` measures host time on the GPU machine, where device time is scarce.
This measures the part of it that is our own Python, on any CPU: each op's eager path runs as it
would on CUDA (argument checks, autograd Function, launcher arithmetic, allocations), except that
every Triton launch is replaced by a no-op. Inputs are CPU tensors of a GPT-2-small activation
(8 x 512 x 768 bf16) and a GroupNorm image (8 x 256 x 32 x 32 channels_last). Forward only: the
backward's time on CPU is dominated by accumulating gradients into the inputs, which on CUDA is an
asynchronous kernel.

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


class _NoLaunch:
    """Stands in for a kernel's launcher: ``[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches() -> None:
    """Make every slipstream op take its kernel path on CPU tensors, with launches that do nothing."""
    from slipstream.ops import _triton_op
    from slipstream.ops.kernels import group_norm as group_norm_kernels

    always = lambda x: True  # noqa: E731
    for name in ("layer_norm", "dropout", "group_norm"):
        sys.modules[f"slipstream.ops.{name}"].use_triton = always
    _triton_op.use_triton = always
    _triton_op.interpreting = lambda: False
    _triton_op._cached = lambda kernel: _NoLaunch()
    group_norm_kernels.interpreting = lambda: False
    group_norm_kernels._max_fused_set = lambda device_index: 132  # an H100's SM count


def cases() -> dict[str, Callable[[], object]]:
    from slipstream.ops import group_norm, layer_norm, seeded_dropout

    x = torch.randn(8, 512, 768, dtype=torch.bfloat16)
    w, b = torch.randn(768, dtype=torch.bfloat16), torch.randn(768, dtype=torch.bfloat16)
    image = torch.randn(8, 256, 32, 32, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    gw, gb = torch.randn(256, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16)
    return {
        "layer_norm forward": lambda: layer_norm(x, (768,), w, b),
        "dropout forward": lambda: seeded_dropout(x, 0.1, 1234),
        "group_norm forward": lambda: group_norm(image, 32, gw, gb),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="also print a cProfile of this case, e.g. 'group_norm forward'")
    args = parser.parse_args(argv)
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
