"""Seeded dropout on the GPU: checks, then timings against F.dropout (eager and torch.compile).

``--tune`` also times the forward kernel alone over tilings (elements per program, warps): the data
behind the defaults in ``slipstream/ops/kernels/dropout.py``.

Run: ``PYTHONPATH=. python benchmarks/dropout.py [--out dropout.md] [--tune]``

1. Checks (random inputs): the kernel's mask equals the PyTorch reference's, bit for bit, for one
   seed, per-row seeds, a transposed view, and tensors past 2**31 elements; values and gradients
   match float64; SeededDropout compiles with zero graph breaks and recomputes correctly under
   ``torch.utils.checkpoint`` and under ``torch.compile``.
2. Timings: forward and forward+backward at (8192, 4096) and (32768, 8192), bf16 and fp32. Bytes
   counted: forward 2 x numel x element size, forward+backward 4 x (ARCHITECTURE.md).
3. Memory: bytes autograd saves per element, and the peak memory of forward+backward through 24
   Linear+GELU+Dropout blocks with nn.Dropout and with SeededDropout.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from benchmarks.common import (
    Table, command_line, copy_bandwidth_gbs, do_bench_median, environment_line, gbs, rel_error, write_section,
)
from slipstream.nn import SeededDropout, load_run_state, save_run_state
from slipstream.ops.dropout import keep_mask, keep_threshold, seeded_dropout, seeded_dropout_rows
from slipstream.ops.kernels import dropout as kernels
from slipstream.ops.philox import philox

P = 0.1
SHAPES = [(8192, 4096), (32768, 8192)]
DTYPES = [torch.bfloat16, torch.float32]


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    (dx,) = torch.autograd.grad(fn(x), x, dy)
    return dx


def _expected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x.double() / (1 - P), torch.zeros((), dtype=torch.float64, device=x.device))


def _nonzero(*shape: int, dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """Random magnitudes in [0.5, 1.5), alternating signs: never 0, so ``out != 0`` is exactly the keep mask."""
    values = torch.rand(shape, device="cuda").add_(0.5)
    values.view(-1)[::2].neg_()
    return values.to(dtype).requires_grad_(requires_grad)


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when equal, else how many differ and the column-in-group histogram of the first ones."""
    diff = (got.cpu() != want.cpu()).flatten()
    if not diff.any():
        return ""
    where = diff.nonzero().flatten()
    lanes = torch.bincount(where[:4096] % 8, minlength=8).tolist()
    return f"{int(diff.sum())}/{diff.numel()} differ, first at {where[:4].tolist()}, lanes {lanes}"


def check_ops(log: list[str]) -> None:
    """Masks equal the CPU reference bit for bit; values and gradients against float64."""
    problems = []
    for dtype in DTYPES:
        for seed in (5, -5, 2**40 + 3, int(torch.randint(-(2**62), 2**62, ()))):
            x = _nonzero(1000, 1037, dtype=dtype, requires_grad=True)
            y = seeded_dropout(x, P, seed)
            mask = keep_mask(torch.tensor(seed), P, x.numel()).view(x.shape).cuda()
            if bad := _mismatch(y != 0, mask):
                problems.append(f"one seed {seed} {dtype}: {bad}")
                continue
            dy = torch.randn_like(x)
            if rel_error(y.detach(), _expected(x.detach(), mask)) > 1e-2 or rel_error(
                _grad(lambda t: seeded_dropout(t, P, seed), x, dy), _expected(dy, mask)
            ) > 1e-2:
                problems.append(f"one seed {seed} {dtype}: values or gradient off")
        x = _nonzero(1000, 1037, dtype=dtype)
        seeds = torch.randint(-(2**63), 2**63 - 1, (x.shape[0],))
        rows = seeded_dropout_rows(x, P, seeds.cuda())
        if bad := _mismatch(rows != 0, keep_mask(seeds, P, x.shape[1])):
            problems.append(f"per-row {dtype}: {bad}")
        xt = x.t().contiguous().t()  # column-major storage, same values
        if not torch.equal(seeded_dropout_rows(xt, P, seeds.cuda()), rows):
            problems.append(f"transposed {dtype} differs from contiguous")
    log.append("masks equal the CPU reference (one seed, per-row seeds, transposed view); values and grads match "
               "float64" if not problems else "MASK CHECK FAILED: " + "; ".join(problems))


@triton.jit
def _philox_words_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    """tl.philox with the counters the dropout kernel uses: (g, 0, 0, 0) for g < BLOCK."""
    g = tl.arange(0, BLOCK)
    c0 = g.to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, zero, zero, zero)
    tl.store(out_ptr + g * 4, w0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + g * 4 + 1, w1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + g * 4 + 2, w2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + g * 4 + 3, w3.to(tl.int64) & 0xFFFFFFFF)


def diagnose_philox() -> str:
    """Raw tl.philox words on this GPU against slipstream.ops.philox on the CPU and on the GPU."""
    results = []
    for seed in (5, -5, 2**40 + 3, -(2**61) + 12345):
        out = torch.empty(256 * 4, dtype=torch.int64, device="cuda")
        _philox_words_kernel[(1,)](out, seed, BLOCK=256)
        want = torch.stack(philox(seed, torch.arange(256)), dim=1).reshape(-1)
        on_gpu = torch.stack(philox(torch.tensor(seed, device="cuda"), torch.arange(256, device="cuda")), dim=1)
        results.append(f"seed {seed}: kernel {'==' if torch.equal(out.cpu(), want) else '!='} CPU reference, "
                       f"CUDA reference {'==' if torch.equal(on_gpu.reshape(-1).cpu(), want) else '!='} CPU reference")
    return "; ".join(results)


def check_past_int32(log: list[str]) -> None:
    """Tensors past 2**31 elements: the tail's mask still matches the reference."""
    n = 2**31 + 4099
    x = _nonzero(n, dtype=torch.bfloat16)
    y = seeded_dropout(x, P, 77)
    tail = 1 << 20
    flat = _mismatch(y[-tail:] != 0, keep_mask(torch.tensor(77), P, n, start=n - tail)[0])
    del x, y
    x = _nonzero(65536, 32771, dtype=torch.bfloat16)
    seeds = torch.randint(0, 2**62, (x.shape[0],))
    y = seeded_dropout_rows(x, P, seeds.cuda())
    rows = _mismatch(y[-3:] != 0, keep_mask(seeds[-3:], P, x.shape[1]))
    del x, y
    log.append("past 2**31 elements: one-seed and per-row tails match the reference" if not (flat or rows)
               else f"PAST-2**31 CHECK FAILED: one seed: {flat or 'ok'}; per row: {rows or 'ok'}")


class _Block(nn.Module):
    def __init__(self, width: int, dropout: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.gelu(self.linear(x)))


def _stack(width: int, blocks: int, dropout: Callable[[], nn.Module]) -> nn.Sequential:
    return nn.Sequential(*[_Block(width, dropout()) for _ in range(blocks)])


def _grads_of(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              state: tuple[dict, dict]) -> list:
    weights, seeds = state
    model.load_state_dict(weights)
    load_run_state(model, seeds)  # the seed streams are run state, not in the state_dict
    model.zero_grad()
    run(x).float().square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def check_module(log: list[str]) -> None:
    """Compile without graph breaks; checkpoint and compile reproduce eager gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = _stack(256, 3, lambda: SeededDropout(P)).cuda()
    state = ({k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
             save_run_state(model))
    x = torch.randn(64, 256, device="cuda", requires_grad=True)  # reentrant checkpoint needs one
    explained = torch._dynamo.explain(model)(x)
    problems = [] if explained.graph_break_count == 0 else [f"graph breaks: {explained.break_reasons}"]
    reference = _grads_of(model, model, x, state)
    for reentrant in (False, True):
        def checkpointed(h: torch.Tensor, reentrant: bool = reentrant) -> torch.Tensor:
            for block in model:
                h = checkpoint(block, h, use_reentrant=reentrant, preserve_rng_state=False)
            return h

        got = _grads_of(model, checkpointed, x, state)
        if not all(torch.allclose(a, b) for a, b in zip(got, reference)):
            problems.append(f"checkpoint(use_reentrant={reentrant}) grads differ")
    torch._dynamo.reset()
    compiled = torch.compile(model)
    got = _grads_of(model, compiled, x, state)
    if not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(got, reference)):
        problems.append("torch.compile (inductor) grads differ")
    log.append("SeededDropout: 0 graph breaks; checkpoint (reentrant and not) and torch.compile match eager grads"
               if not problems else "MODULE CHECK FAILED: " + "; ".join(problems))


def _time_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    with torch.no_grad():
        return do_bench_median(lambda: fn(x))


def _time_forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    return do_bench_median(lambda: _grad(fn, x, dy))


def bench_ops(copy_gbs: float, table: Table, targets: list[str]) -> None:
    seed = 1234
    ours = lambda t: seeded_dropout(t, P, seed)  # noqa: E731
    eager = lambda t: F.dropout(t, P, training=True)  # noqa: E731
    compiled = torch.compile(eager, dynamic=False)
    for shape in SHAPES:
        for dtype in DTYPES:
            x = torch.randn(shape, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            size = x.numel() * x.element_size()
            results = {}
            for name, fn in (("slipstream", ours), ("eager", eager), ("torch.compile", compiled)):
                results[name] = (_time_forward(fn, x), _time_forward_backward(fn, x, dy))
            for name, (fwd, fwd_bwd) in results.items():
                fwd_gbs, fb_gbs = gbs(2 * size, fwd), gbs(4 * size, fwd_bwd)
                table.add(
                    f"{shape[0]}x{shape[1]}", str(dtype).replace("torch.", ""), name,
                    fwd * 1e3, fwd_gbs, fwd_gbs / copy_gbs, fwd_bwd * 1e3, fb_gbs, fb_gbs / copy_gbs,
                    results["eager"][1] / fwd_bwd,
                )
                print(" | ".join(table.rows[-1]), flush=True)
            fwd, fwd_bwd = results["slipstream"]
            targets.append(
                f"{shape} {dtype}: forward {gbs(2 * size, fwd) / copy_gbs:.1%} and forward+backward "
                f"{gbs(4 * size, fwd_bwd) / copy_gbs:.1%} of copy (target >= 85%); fwd+bwd "
                f"{results['eager'][1] / fwd_bwd:.2f}x eager (target >= 1.15x in bf16)"
            )
            del x, dy


def tune(copy_gbs: float) -> str:
    """Forward kernel alone over tilings; the fastest per shape and dtype is marked."""
    table = Table(["shape", "dtype", "elements/program", "warps", "us", "fwd / copy", "fastest"])
    for shape in SHAPES:
        for dtype in DTYPES:
            x = torch.randn(shape, device="cuda", dtype=dtype).view(1, -1)
            out = torch.empty_like(x)
            timings = {}
            for block in (2048, 4096, 8192):
                for warps in (4, 8, 16):
                    if not 4 <= block // (32 * warps) <= 64:
                        continue
                    launch = lambda b=block, w=warps: kernels.launch_seeded_dropout(  # noqa: E731
                        x, out, keep_threshold(P), 1 / (1 - P), seed=5, block_elements=b, num_warps=w)
                    timings[block, warps] = do_bench_median(launch)
            best = min(timings, key=timings.get)
            for (block, warps), ms in timings.items():
                share = gbs(2 * x.numel() * x.element_size(), ms) / copy_gbs
                table.add(f"{shape[0]}x{shape[1]}", str(dtype).replace("torch.", ""), block, warps, ms * 1e3, share,
                          "*" if (block, warps) == best else "")
    return table.markdown()


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of ``fn``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def peak_memory(dropout: Callable[[], nn.Module], width: int, tokens: int, blocks: int) -> tuple[int, float]:
    """Peak bytes above the model and input during forward+backward, and its median time in ms."""
    torch.manual_seed(0)
    model = _stack(width, blocks, dropout).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        model(x).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench_median(step)
    del model, x
    torch.cuda.empty_cache()
    return peak, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown section here")
    parser.add_argument("--tune", action="store_true", help="also time the forward kernel over tilings")
    args = parser.parse_args()
    torch.manual_seed(0)
    log: list[str] = []
    for check in (check_ops, check_past_int32, check_module):
        try:
            check(log)
        except Exception as error:  # report and go on: the timings are still worth having
            log.append(f"{check.__name__} RAISED {type(error).__name__}: {error}")
        torch.cuda.empty_cache()
        print(log[-1], flush=True)
    try:
        log.append("raw Philox words: " + diagnose_philox())
    except Exception as error:
        log.append(f"diagnose_philox RAISED {type(error).__name__}: {error}")
    print(log[-1], flush=True)
    copy_gbs = copy_bandwidth_gbs()

    table = Table(["shape", "dtype", "impl", "fwd us", "fwd GB/s", "fwd / copy", "fwd+bwd us", "fwd+bwd GB/s",
                   "fwd+bwd / copy", "fwd+bwd vs eager"])
    targets: list[str] = []
    bench_ops(copy_gbs, table, targets)

    x = torch.randn(SHAPES[0], device="cuda", dtype=torch.bfloat16)
    saved = Table(["impl", "bytes saved for backward", "per element"])
    for name, fn in (("slipstream", lambda t: seeded_dropout(t, P, 1)), ("eager", lambda t: F.dropout(t, P, True))):
        nbytes = saved_bytes(fn, x)
        saved.add(name, nbytes, nbytes / x.numel())
    del x

    width, tokens, blocks = 4096, 8192, 24
    mask_bytes = blocks * tokens * width  # one bool per element per block
    memory = Table(["dropout", "peak MiB above model", "fwd+bwd ms"])
    peaks = {}
    for name, make in (("nn.Dropout", lambda: nn.Dropout(P)), ("SeededDropout", lambda: SeededDropout(P))):
        peaks[name], ms = peak_memory(make, width, tokens, blocks)
        memory.add(name, peaks[name] / 2**20, ms)
    saving = peaks["nn.Dropout"] - peaks["SeededDropout"]
    targets.append(
        f"24-block stack: peak lower by {saving / 2**20:.0f} MiB; masks' bytes {mask_bytes / 2**20:.0f} MiB "
        f"(target: saving >= masks' bytes: {'met' if saving >= mask_bytes else 'missed'})"
    )

    body = "\n\n".join([
        f"Copy bandwidth (same run): {copy_gbs:.0f} GB/s. p={P}. Effective bandwidth counts 2 x numel x "
        "element size forward, 4 x forward+backward; `us` are do_bench medians.",
        table.markdown(),
        "Autograd's saved tensors, one forward at 8192x4096 bf16:",
        saved.markdown(),
        f"Forward+backward through {blocks} blocks of Linear({width}, {width}) + GELU + Dropout, bf16, "
        f"{tokens} tokens (masks would take {mask_bytes / 2**20:.0f} MiB):",
        memory.markdown(),
        "Checks: " + "; ".join(log) + ".",
        "Targets: " + "; ".join(targets) + ".",
    ])
    env = environment_line(command_line())
    write_section(args.out, "Seeded (low-memory) dropout", env, body)
    if args.tune:  # last: the results above are already written if this runs out of time
        body += f"\n\nForward kernel alone over tilings (`--tune`):\n\n{tune(copy_gbs)}"
        write_section(args.out, "Seeded (low-memory) dropout", env, body)


if __name__ == "__main__":
    main()
