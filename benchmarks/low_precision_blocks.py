"""Time a LayerNorm->Linear block and a GroupNorm->Conv2d block, plain vs Low Precision norms.

Forward+backward under bf16 autocast on one GPU, ``triton.testing.do_bench`` median. The inputs
arrive in fp32 (as a residual stream does under autocast) so the plain norms pay autocast's
upcast and the LP norms show what they save.

Run: ``python benchmarks/low_precision_blocks.py [--out docs/results/low_precision_blocks.md]``
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import slipstream.functional as sf
from benchmarks.common import Table, command_line, do_bench_median, environment_line, rel_error, write_section


def layer_norm_block(width: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))


def group_norm_block(channels: int) -> nn.Module:
    return nn.Sequential(nn.GroupNorm(32, channels), nn.Conv2d(channels, channels, 3, padding=1))


def fwd_bwd(model: nn.Module, x: torch.Tensor):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        x.grad = None
        for p in model.parameters():
            p.grad = None

    return step


CASES = [
    ("LayerNorm->Linear", "(16384, 1024)", lambda: layer_norm_block(1024), (16384, 1024), None),
    ("LayerNorm->Linear", "(8192, 4096)", lambda: layer_norm_block(4096), (8192, 4096), None),
    ("GroupNorm->Conv2d", "[16,256,64,64]", lambda: group_norm_block(256), (16, 256, 64, 64), torch.contiguous_format),
    ("GroupNorm->Conv2d", "[16,256,64,64] NHWC", lambda: group_norm_block(256), (16, 256, 64, 64), torch.channels_last),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="also write the markdown section here")
    args = parser.parse_args()

    table = Table(["block", "shape", "plain ms", "LP ms", "speed-up", "LP norms", "rel. err vs plain"])
    for name, label, build, shape, layout in CASES:
        torch.manual_seed(0)
        plain = build().cuda()
        if layout is not None:
            plain = plain.to(memory_format=layout)
        lp = copy.deepcopy(plain)
        replaced = sf.apply_low_precision_layernorm(lp) if "LayerNorm" in name else sf.apply_low_precision_groupnorm(lp)
        x = torch.randn(shape, device="cuda", requires_grad=True)
        if layout is not None:
            x = x.detach().to(memory_format=layout).requires_grad_()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            err = rel_error(lp(x), plain(x).double())
        t_plain = do_bench_median(fwd_bwd(plain, x))
        t_lp = do_bench_median(fwd_bwd(lp, x))
        table.add(name, label, t_plain, t_lp, f"{t_plain / t_lp:.2f}x", len(replaced), f"{err:.1e}")
    write_section(args.out, "Low Precision LayerNorm / GroupNorm blocks (bf16 autocast, fwd+bwd)",
                  environment_line(command_line()), table.markdown())


if __name__ == "__main__":
    main()
