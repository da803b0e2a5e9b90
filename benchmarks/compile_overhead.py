"""Host overhead of slipstream's ops under torch.compile: checks, then a GPT-2-small-like step.

Run: ``PYTHONPATH=. python benchmarks/compile_overhead.py [--out compile_overhead.md] [--steps 20]``

1. Checks (CUDA, random inputs): compiled == eager, bit for bit, for layer_norm followed by
   seeded_dropout and seeded_dropout_rows, forward and backward (output and the gradients of x,
   weight and bias), at three shapes, the last with the wide-row kernels, with
   ``slipstream.config.compiled_layer_norm = 'kernel'``: the compiled path traces the ``triton_op``
   bodies; eager mode launches the same kernels directly. Also counts Inductor's
   warnings that it could not analyse which tensors a traced kernel writes (it then clones them all).
2. Timing: 12 blocks of ``x + Dropout(Linear(GELU(Linear(LayerNorm(x)))))`` (768 -> 3072 -> 768),
   batch 8 x 512 tokens, bf16 autocast, forward + backward: nn.LayerNorm/nn.Dropout against
   FusedLayerNorm/SeededDropout (``apply_fused_layernorm`` + ``apply_low_memory_dropout``), in eager
   mode and under ``torch.compile`` (ours with each ``compiled_layer_norm`` path). Median step time
   from CUDA events, and the median host time to enqueue a step (its Python and launch cost, with no
   synchronization).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import slipstream.config
import slipstream.functional as sf
from benchmarks.common import Table, command_line, environment_line, slipstream_settings, write_section
from slipstream.ops import layer_norm, seeded_dropout, seeded_dropout_rows

WIDTH, HIDDEN, BLOCKS, BATCH, TOKENS = 768, 3072, 12, 8, 512


class _CountWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _compare(fn: Callable, inputs: tuple, dy: torch.Tensor) -> tuple[bool, float]:
    """Whether compiled ``fn`` equals eager ``fn`` bit for bit (output and input grads), and the max diff."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    results = []
    for run in (fn, compiled):
        out = run(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, dy)))
    pairs = list(zip(*results))
    return all(torch.equal(a, b) for a, b in pairs), max(_max_diff(a, b) for a, b in pairs)


def check_compiled_equals_eager(table: Table) -> None:
    for rows, n, dtype in [(4 * 37, 768, torch.bfloat16), (300, 1000, torch.float32), (17, 20000, torch.bfloat16)]:
        x = (torch.randn(rows, n, device="cuda") * 2 + 1).to(dtype).requires_grad_()
        w = (torch.randn(n, device="cuda") * 0.5 + 1).requires_grad_()
        b = torch.randn(n, device="cuda").requires_grad_()
        seeds = torch.randint(0, 2**62, (rows,), device="cuda")

        def ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return seeded_dropout_rows(seeded_dropout(layer_norm(x, n, w, b), 0.1, 1234), 0.2, seeds)

        same, diff = _compare(ops, (x, w, b), torch.randn(rows, n, device="cuda").to(dtype))
        table.add("layer_norm -> seeded_dropout -> seeded_dropout_rows", f"{rows}x{n} {dtype}", same, diff)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


def _time_steps(model: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(first step s, median step ms from CUDA events, median host ms to enqueue a step)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    device_ms, host_ms = [], []
    for _ in range(steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        t0 = time.perf_counter()
        step()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        device_ms.append(begin.elapsed_time(end))
    return first, statistics.median(device_ms), statistics.median(host_ms)


def time_stack(table: Table, steps: int) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(*[Block() for _ in range(BLOCKS)]).cuda()
    ours = copy.deepcopy(base)
    sf.apply_fused_layernorm(ours)
    sf.apply_low_memory_dropout(ours, seed=0)
    x = torch.randn(BATCH, TOKENS, WIDTH, device="cuda")
    runs = [("eager", "nn.LayerNorm + nn.Dropout", base, None), ("eager", "FusedLayerNorm + SeededDropout", ours, None),
            ("torch.compile", "nn.LayerNorm + nn.Dropout", base, None)]
    runs += [("torch.compile", f"FusedLayerNorm ({path}) + SeededDropout", ours, path)
             for path in ("inductor", "kernel")]
    for mode, name, model, layer_norm_path in runs:
        torch._dynamo.reset()
        with slipstream_settings(compiled_layer_norm=layer_norm_path or slipstream.config.compiled_layer_norm):
            run = model if mode == "eager" else torch.compile(model)
            first, device_ms, host_ms = _time_steps(run, x, steps)
        table.add(mode, name, first, device_ms, host_ms)
        print(table.rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file for the results")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    args = parser.parse_args()
    warnings = _CountWarnings()
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addHandler(warnings)

    checks = Table(["ops", "shape", "compiled == eager (bits)", "max abs diff"])
    with slipstream_settings(compiled_layer_norm="kernel"):  # the triton_op path: the same kernels as eager, so the same bits
        check_compiled_equals_eager(checks)
    print(checks.markdown(), flush=True)
    timings = Table(["mode", "norms + dropouts", "first step (s)", "step (ms, CUDA events)", "host enqueue (ms)"])
    time_stack(timings, args.steps)
    body = (
        f"{checks.markdown()}\n\nInductor warnings that a traced kernel's mutations could not be analysed: "
        f"{warnings.count}\n\n{BLOCKS} blocks, batch {BATCH}x{TOKENS}, width {WIDTH}, bf16 autocast, "
        f"forward+backward, median of {args.steps} steps:\n\n{timings.markdown()}"
    )
    write_section(args.out, "Compile overhead: triton_op path", environment_line(command_line()), body)


if __name__ == "__main__":
    main()
