"""Gyro Dropout on the GPU: checks, then forward+backward step time against ``nn.Dropout``.

Run: ``PYTHONPATH=. python benchmarks/gyro_step_time.py [--out gyro_step_time.md] [--no-compile]``

1. Checks (random inputs): CUDA output and gradient against a float64 per-sample-mask reference
   (even and uneven batches, bf16 and fp32); the masks built for a CUDA input equal the CPU ones.
2. The dropout alone, forward+backward under bf16: median time, effective bandwidth (4 x numel x
   element size, ARCHITECTURE.md) beside the copy bandwidth, and bytes autograd saves.
3. Model steps, forward+backward under bf16 autocast: a classifier head (the paper's setting:
   dropout between wide Linear layers) and a transformer-style FFN block, eager and torch.compile.
   Gyro is applied with ``apply_gyro_dropout`` (each forward advances the schedule in eager; under
   compile the step calls ``advance()`` outside the graph, as the Trainer algorithm does).
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch import nn

import slipstream.functional as sf
from benchmarks.common import (
    Table, command_line, copy_bandwidth_gbs, do_bench_median, environment_line, gbs, rel_error, write_section,
)
from slipstream.nn import GyroDropout

P = 0.5
SIGMA, TAU = 256, 16


def expected(drop: GyroDropout, x: torch.Tensor, step: int) -> torch.Tensor:
    """Float64 reference: each sample's group, its mask row, written out per sample."""
    rows = drop.schedule[(step // drop.iter_num) % drop.schedule.shape[0]]
    size, larger = divmod(x.shape[0], drop.tau)
    groups = [g for g in range(drop.tau) for _ in range(size + (g < larger))]
    mask = drop.masks[rows[groups]].to(x.device, torch.float64) / (1 - drop.p)
    return x.double() * mask.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])


def check(log: list[str]) -> None:
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        for shape in ((256, 4096), (250, 4096), (7, 3, 129), (10, 1023)):
            drop = GyroDropout(P, SIGMA, TAU, seed=1)
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            y = drop(x)
            assert rel_error(y.detach(), expected(drop, x.detach(), 0)) < tol, f"values {shape} {dtype}"
            dy = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, dy)
            assert rel_error(dx, expected(drop, dy, 0)) < tol, f"gradient {shape} {dtype}"
    on_cpu, on_gpu = GyroDropout(P, SIGMA, TAU, seed=5), GyroDropout(P, SIGMA, TAU, seed=5)
    x = torch.randn(64, 300)
    assert torch.equal(on_cpu(x), on_gpu(x.cuda()).cpu()), "CUDA and CPU runs differ"
    log.append("checks passed: CUDA values and gradients match float64 (fp32 and bf16, even/uneven/B<tau, 3-D); "
               "CUDA masks equal CPU masks for one seed")


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn(x)``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(sizes)


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step():
        torch.autograd.grad(fn(x), x, dy)

    return step


def time_dropout_alone(copy_gbs: float) -> str:
    table = Table(["shape (bf16)", "method", "fwd+bwd ms", "GB/s", "of copy", "saved for backward"])
    for shape in ((8192, 4096), (16, 1024, 4096), (250, 4096)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        nbytes = 4 * x.numel() * x.element_size()
        for name, module in (("nn.Dropout", nn.Dropout(P)), (f"Gyro σ={SIGMA} τ={TAU}", GyroDropout(P, SIGMA, TAU, seed=0))):
            module(x)  # builds Gyro's masks
            ms = do_bench_median(fwd_bwd(module, x, dy))
            saved = saved_bytes(module, x)
            table.add(str(shape), name, ms, gbs(nbytes, ms), f"{gbs(nbytes, ms) / copy_gbs:.0%}",
                      f"{saved / 2**20:.2f} MiB")
    return table.markdown()


def head(width: int = 4096, classes: int = 1000) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(P), nn.Linear(width, width), nn.ReLU(),
                         nn.Dropout(P), nn.Linear(width, classes))


class FFNBlock(nn.Module):
    def __init__(self, width: int = 1024):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(P), nn.Linear(4 * width, width),
                                 nn.Dropout(P))

    def forward(self, x):
        return x + self.ffn(self.norm(x))


#: (model, input label, builder, input shape, also timed under torch.compile)
MODELS = [
    ("head 4096-4096-4096-1000", "[256, 4096]", head, (256, 4096), False),
    ("head 4096-4096-4096-1000", "[2048, 4096]", head, (2048, 4096), True),
    ("head 4096-4096-4096-1000", "[2000, 4096] (B % τ ≠ 0)", head, (2000, 4096), False),
    ("FFN block 1024-4096-1024", "[16, 1024, 1024]", FFNBlock, (16, 1024, 1024), True),
]


def model_step(model: nn.Module, x: torch.Tensor, gyros: list[GyroDropout]) -> Callable[[], None]:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        for p in model.parameters():
            p.grad = None
        for gyro in gyros:  # only in manual mode (compiled): once per step, outside the graph
            gyro.advance()

    return step


def time_models(compile_too: bool) -> str:
    table = Table(["model", "input", "mode", "nn.Dropout ms", "Gyro ms", "Gyro / Dropout"])
    for name, label, build, shape, compiled in MODELS:
        modes = ["eager", "compile"] if compile_too and compiled else ["eager"]
        for mode in modes:
            torch.manual_seed(0)
            plain = build().cuda()
            gyro = copy.deepcopy(plain)
            manual = mode == "compile"
            sf.apply_gyro_dropout(gyro, SIGMA, TAU, iters_per_epoch=196, max_epoch=100, advance_on_forward=not manual)
            x = torch.randn(shape, device="cuda")
            gyros = [m for m in gyro.modules() if isinstance(m, GyroDropout)] if manual else []
            model_step(gyro, x, gyros)()  # builds the masks (in bf16) outside any graph
            if manual:
                plain, gyro = torch.compile(plain), torch.compile(gyro)
            steps = [model_step(plain, x, []), model_step(gyro, x, gyros)]
            for step in steps * 3:  # compiles before timing starts
                step()
            t_plain, t_gyro = (do_bench_median(step, warmup_ms=200, rep_ms=300) for step in steps)
            table.add(name, label, mode, t_plain, t_gyro, f"{t_gyro / t_plain:.3f}")
            print(table.rows[-1], flush=True)
    return table.markdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="also write the markdown section here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    log: list[str] = []
    check(log)
    copy_gbs = copy_bandwidth_gbs()
    alone = time_dropout_alone(copy_gbs)
    print(alone, flush=True)
    models = time_models(not args.no_compile)
    body = (
        f"{log[0]}. Copy bandwidth {copy_gbs:.0f} GB/s. p={P}, σ={SIGMA}, τ={TAU}.\n\n"
        f"Dropout alone, forward+backward:\n\n{alone}\n\n"
        f"Model step (forward+backward, bf16 autocast, median of `do_bench`):\n\n{models}\n"
    )
    write_section(args.out, "Gyro Dropout step time", environment_line(command_line()), body)


if __name__ == "__main__":
    main()
