"""Fused LayerNorm on the GPU: correctness, then forward and forward+backward bandwidth against peers.

Peers, in the same process: PyTorch eager (``F.layer_norm``), ``torch.compile`` of it, and
Liger-Kernel's LayerNorm where it is installed. Effective bandwidth counts the fewest bytes
(forward 2 x numel x element size, forward+backward 5 x) over the ``do_bench`` median, beside the
device-to-device copy bandwidth measured first. Weights and biases are in the input's dtype.

``--tune`` also times candidate tilings of slipstream's kernels at every shape (compiled first in
parallel worker processes) and prints the fastest: the data behind the defaults in
``slipstream/ops/kernels/layer_norm.py``.

Run: ``python benchmarks/layer_norm.py [--out docs/results/layer_norm.md] [--plot layer_norm.png] [--tune]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Table, command_line, copy_bandwidth_gbs, do_bench_median, environment_line, gbs, rel_error, write_section,
)
from slipstream.ops.kernels import layer_norm as kernels
from slipstream.ops.layer_norm import layer_norm

EPS = 1e-5
SHAPES = [(16384, 1024), (8192, 4096), (4096, 8192), (2048, 16384), (512, 65536),
          (43690, 768), (13107, 2560), (6554, 5120)]
#: Shapes of the mixed-precision comparison (fp32 input, bf16 output): GPT-2 small, BERT-base, a wide model.
MIXED_SHAPES = [(16384, 768), (16384, 1024), (8192, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Largest relative error against float64 that passes, per dtype of the data.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random_inputs(m: int, n: int, dtype: torch.dtype, param_dtype: Optional[torch.dtype] = None, grad=False):
    """x (offset and scaled, as activations are), weight, bias, dy: random, never zeros."""
    param_dtype = param_dtype or dtype
    x = (torch.randn(m, n, device="cuda") * 2 + 0.5).to(dtype).requires_grad_(grad)
    w = (torch.randn(n, device="cuda") * 0.5 + 1).to(param_dtype).requires_grad_(grad)
    b = torch.randn(n, device="cuda").to(param_dtype).requires_grad_(grad)
    dy = torch.randn(m, n, device="cuda").to(dtype)
    return x, w, b, dy


def poison_allocator(*shapes_dtypes) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so unwritten outputs show."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


# ----------------------------------------------------------------------------------------------
# Correctness


def check_case(x, w, b, dy, normalized_shape, out_dtype=None) -> dict:
    """Relative errors of slipstream's y, dx, dw, db against float64 autograd of F.layer_norm."""
    leaves = {name: t for name, t in (("x", x), ("w", w), ("b", b)) if t is not None}
    m = x.numel() // math.prod(normalized_shape)
    poison_allocator((x.shape, out_dtype or x.dtype), (x.shape, x.dtype), ((m,), torch.float32))

    def forward_backward(inputs: dict, fn: Callable, grad_out: torch.Tensor):
        y = fn(inputs["x"], normalized_shape, inputs.get("w"), inputs.get("b"), EPS)
        return y, dict(zip(inputs, torch.autograd.grad(y, list(inputs.values()), grad_out)))

    ours = functools.partial(layer_norm, out_dtype=out_dtype)
    y, grads = forward_backward(leaves, ours, dy)
    _, again = forward_backward(leaves, ours, dy)
    y64, grads64 = forward_backward({k: t.detach().double().requires_grad_() for k, t in leaves.items()},
                                    F.layer_norm, dy.double())
    errors = {"y": rel_error(y, y64), **{f"d{k}": rel_error(grads[k], grads64[k]) for k in leaves}}
    errors["deterministic"] = all(torch.equal(grads[k], again[k]) for k in leaves)
    errors["dtypes ok"] = y.dtype == (out_dtype or x.dtype) and all(grads[k].dtype == t.dtype for k, t in leaves.items())
    return errors


def correctness(report: list) -> bool:
    """Check odd shapes, every layout and dtype case, and every benchmark shape; True if all pass."""
    table = Table(["case", "dtype", "shape", "y", "dx", "dw", "db", "deterministic", "pass"])
    ok_all = True
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m, n in [(1, 5), (7, 33), (3, 1000), (5, 1537), (33, 4097), (9, 16385), (3, 65536 + 7), (1000, 7)]:
            cases.append(("affine", dtype, m, n, None, None))
        cases.append(("no affine", dtype, 37, 1000, "none", None))
        cases.append(("bias=False", dtype, 37, 1000, "no_bias", None))
        cases.append(("strided x", dtype, 37, 1000, "strided", None))
        cases.append(("fp32 params", dtype, 37, 1000, "fp32_params", None))
    cases.append(("fp32 x -> bf16 y", torch.float32, 4096, 768, None, torch.bfloat16))
    cases.append(("fp32 x -> bf16 y", torch.float32, 64, 20000, None, torch.bfloat16))
    for dtype in DTYPES.values():
        for m, n in SHAPES:
            cases.append(("benchmark shape", dtype, m, n, None, None))
    for name, dtype, m, n, variant, out_dtype in cases:
        torch.manual_seed(m * 7919 + n)
        param_dtype = torch.float32 if variant == "fp32_params" else dtype
        x, w, b, dy = random_inputs(m, n, dtype, param_dtype, grad=True)
        if variant == "none":
            w = b = None
        elif variant == "no_bias":
            b = None
        elif variant == "strided":
            wide = (torch.randn(m, n + 24, device="cuda") * 2 + 0.5).to(dtype)
            x = wide[:, 5:5 + n].requires_grad_()
        if out_dtype is not None:
            dy = dy.to(out_dtype)
        errors = check_case(x, w, b, dy, (n,), out_dtype)
        tol = TOLERANCE[out_dtype or dtype]
        tol_dx = max(TOLERANCE[dtype], TOLERANCE[dy.dtype])
        ok = (errors["y"] < tol and errors["dx"] < tol_dx and errors.get("dw", 0) < TOLERANCE[param_dtype]
              and errors.get("db", 0) < TOLERANCE[param_dtype] and errors["deterministic"] and errors["dtypes ok"])
        ok_all &= ok
        table.add(name, str(dtype).replace("torch.", ""), f"{m}x{n}", *(f"{errors.get(k, float('nan')):.1e}"
                  for k in ("y", "dx", "dw", "db")), errors["deterministic"], "ok" if ok else "FAIL")
    report.append("### Correctness (relative error against float64)\n\n" + table.markdown())
    print(report[-1], flush=True)
    return ok_all


def compile_check(report: list) -> None:
    """Graph breaks of a compiled block with FusedLayerNorm under CUDA autocast, and its numerics."""
    from slipstream.nn import FusedLayerNorm

    block = torch.nn.Sequential(torch.nn.Linear(256, 256), FusedLayerNorm(256), torch.nn.GELU()).cuda()
    x = torch.randn(64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explain = torch._dynamo.explain(block)(x)
        compiled = torch.compile(block)(x)
        eager = block(x)
    line = (f"torch.compile with FusedLayerNorm under bf16 autocast: {explain.graph_break_count} graph breaks, "
            f"{explain.graph_count} graph(s); output {compiled.dtype}, max |compiled - eager| = "
            f"{(compiled.float() - eager.float()).abs().max().item():.2e}")
    report.append(line)
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# Tuning


def tuning_candidates(n: int) -> list[tuple[str, kernels.Tiling]]:
    """(kernel, tiling) pairs worth timing for rows of ``n`` elements."""
    block_n = 1 << (n - 1).bit_length()
    out = []
    if block_n <= kernels.MAX_REGISTER_ROW:
        for block_m, warps, per_sm, prefetch in itertools.product((1, 2, 4, 8), (2, 4, 8, 16, 32), (0, 2, 4, 8),
                                                                  (True, False)):
            if 8 <= block_m * block_n // (32 * warps) <= 32 and block_m * block_n <= 16384 and (prefetch or not per_sm):
                out.append(("forward", kernels.Tiling(block_m, block_n, warps, per_sm, prefetch)))
    else:
        for chunk, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
            if 4 <= chunk // (32 * warps) <= 32:
                out.append(("forward", kernels.Tiling(1, chunk, warps)))
    if block_n <= kernels.MAX_BACKWARD_REGISTER_ROW:
        tiles = [(bm, block_n, w) for bm, w in itertools.product((1, 2, 4), (2, 4, 8, 16, 32))
                 if 4 <= bm * block_n // (32 * w) <= 16]
    else:
        tiles = [(2, 1024, 8), (4, 512, 4), (8, 256, 4), (4, 1024, 8), (8, 512, 8), (16, 256, 8), (2, 512, 4),
                 (4, 256, 4)]
    for (bm, bn, w), pps, prefetch in itertools.product(tiles, (1, 2, 4, 8), (True, False)):
        out.append(("backward", kernels.Tiling(bm, bn, w, pps, prefetch)))
    return out


def run_tiling(kind: str, tiling: kernels.Tiling, x, w, b, dy) -> Callable[[], object]:
    if kind == "forward":
        return lambda: kernels.forward(x, w, b, EPS, x.dtype, tiling)
    _, stats = kernels.forward(x, w, b, EPS, x.dtype)
    return lambda: kernels.backward(dy, x, w, stats, b.dtype, tiling)


def _compile_jobs(jobs: list) -> int:
    """Worker: run each (m, n, dtype name, kind, tiling) once, filling Triton's on-disk cache."""
    failures = 0
    for m, n, dtype_name, kind, tiling in jobs:
        try:
            x, w, b, dy = random_inputs(m, n, DTYPES[dtype_name])
            run_tiling(kind, kernels.Tiling(*tiling), x, w, b, dy)()
            torch.cuda.synchronize()
        except Exception:  # a tiling that does not compile is skipped by the timing loop too
            failures += 1
    return failures


def tune(report: list, dtype_names: list[str], workers: int) -> None:
    """Time every candidate tiling at every shape; report the fastest per (dtype, shape, kernel)."""
    # One compile per kernel variant: programs_per_sm changes only the grid.
    variants = {(name, n, kind, dataclasses.replace(t, programs_per_sm=1)): m for name in dtype_names
                for m, n in SHAPES for kind, t in tuning_candidates(n)}
    jobs = [(m, n, name, kind, dataclasses.astuple(t)) for (name, n, kind, t), m in variants.items()]
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        failures = sum(pool.map(_compile_jobs, [jobs[i::workers] for i in range(workers)]))
    print(f"compiled {len(jobs)} variants in {time.time() - start:.0f} s ({failures} failed)", flush=True)
    table = Table(["dtype", "M x N", "kernel", "default tiling", "default GB/s", "best tiling", "best GB/s", "top 3"])
    raw = {}
    for name in dtype_names:
        for m, n in SHAPES:
            x, w, b, dy = random_inputs(m, n, DTYPES[name])
            default = {kind: kernels.default_tiling(kind, n, x.element_size()) for kind in ("forward", "backward")}
            for kind in ("forward", "backward"):
                nbytes = (2 if kind == "forward" else 3) * x.numel() * x.element_size()
                results = {}
                for k, tiling in tuning_candidates(n) + [(kind, default[kind])]:
                    if k != kind or tiling in results:
                        continue
                    try:
                        results[tiling] = gbs(nbytes, do_bench_median(run_tiling(kind, tiling, x, w, b, dy), 3, 15))
                    except Exception as error:  # noqa: BLE001 - report and keep tuning
                        print(f"{name} {m}x{n} {kind} {tiling}: {type(error).__name__}", flush=True)
                ranked = sorted(results.items(), key=lambda kv: -kv[1])
                raw[f"{name} {m}x{n} {kind}"] = [(dataclasses.astuple(t), r) for t, r in ranked]
                top = ", ".join(f"{dataclasses.astuple(t)}: {r:.0f}" for t, r in ranked[:3])
                table.add(name, f"{m}x{n}", kind, dataclasses.astuple(default[kind]), results.get(default[kind], 0.0),
                          dataclasses.astuple(ranked[0][0]), ranked[0][1], top)
            print(table.rows[-2:], flush=True)
    report.append("### Tuning (GB/s of each kernel alone; tiling = block_m, block_n, warps, programs/SM, prefetch)\n\n"
                  + table.markdown())
    report.append("```json\n" + json.dumps(raw) + "\n```")
    print(report[-2], flush=True)


# ----------------------------------------------------------------------------------------------
# Timing against peers


def peers() -> dict[str, Callable]:
    """name -> f(x, w, b) for each LayerNorm implementation available here."""
    found = {"slipstream": lambda x, w, b: layer_norm(x, (x.shape[-1],), w, b, EPS),
             "eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)}
    torch._dynamo.config.cache_size_limit = 64
    found["torch.compile"] = torch.compile(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS), dynamic=False)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        found["Liger"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    except ImportError:
        print("Liger-Kernel not installed: no Liger column", flush=True)
    return found


def device_ms(calls: list[Callable[[], object]], rounds: int = 4) -> float:
    """Median device time of one call, launch overhead excluded.

    Replays a CUDA graph of ``rounds`` passes over ``calls`` (one per input set, each set larger
    than what L2 keeps between them), timed with CUDA events.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compilation, allocator) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / (rounds * len(calls))


def pass_call(fn: Callable, pass_name: str, x, w, b, dy) -> Callable[[], object]:
    """One forward, or one forward and backward, of ``fn`` on these inputs."""
    if pass_name == "forward":
        return lambda: fn(x, w, b)
    return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def peer_table(rows: list[dict], impls: list[str]) -> str:
    table = Table(["dtype", "M x N", "pass"] + [f"{k} GB/s" for k in impls] + ["slipstream % copy", "vs best peer"])
    for row in rows:
        best_peer = max((row[k] for k in impls if k != "slipstream" and row[k] == row[k]), default=float("nan"))
        table.add(row["dtype"], row["shape"], row["pass_name"], *(row[k] for k in impls),
                  f"{100 * row['slipstream'] / row['copy']:.0f}%", f"{row['slipstream'] / best_peer:.2f}x")
    return table.markdown()


def time_peers(report: list, copy_gbs: float, dtype_names: list[str]) -> dict[str, list[dict]]:
    """Forward and forward+backward GB/s of every peer at every shape, by do_bench and by device time."""
    impls = peers()
    results = {"do_bench": [], "device": []}
    for name in dtype_names:
        for m, n in SHAPES:
            input_sets = [random_inputs(m, n, DTYPES[name], grad=True) for _ in range(3)]
            x, w, b, dy = input_sets[0]
            ref = F.layer_norm(x.detach().double(), (n,), w.detach().double(), b.detach().double(), EPS)
            for pass_name, factor in (("forward", 2), ("forward+backward", 5)):
                nbytes = factor * x.numel() * x.element_size()
                rows = {metric: dict(dtype=name, shape=f"{m}x{n}", pass_name=pass_name, copy=copy_gbs)
                        for metric in results}
                for impl, fn in impls.items():
                    try:
                        err = rel_error(fn(x, w, b).detach(), ref)
                        if err > TOLERANCE[x.dtype]:
                            print(f"{impl} {name} {m}x{n}: rel. error {err:.1e}", flush=True)
                        ms = do_bench_median(pass_call(fn, pass_name, *input_sets[0]))
                        rows["do_bench"][impl] = gbs(nbytes, ms)
                        ms = device_ms([pass_call(fn, pass_name, *inputs) for inputs in input_sets])
                        rows["device"][impl] = gbs(nbytes, ms)
                    except Exception as error:  # noqa: BLE001 - a failing peer gets no number
                        print(f"{impl} {name} {m}x{n} {pass_name}: {type(error).__name__}: {error}", flush=True)
                        for metric in results:
                            rows[metric].setdefault(impl, float("nan"))
                for metric in results:
                    results[metric].append(rows[metric])
                print({k: f"{v['slipstream']:.0f}" for k, v in rows.items()}, name, m, n, pass_name, flush=True)
    report.append(f"### Forward and forward+backward, `do_bench` (launch overhead included; copy bandwidth "
                  f"{copy_gbs:.0f} GB/s)\n\n" + peer_table(results["do_bench"], list(impls)))
    report.append("### Forward and forward+backward, device time (CUDA graph replay, launch overhead "
                  "excluded)\n\n" + peer_table(results["device"], list(impls)))
    print(report[-2] + "\n\n" + report[-1], flush=True)
    return results


def time_mixed(report: list) -> None:
    """fp32 input, bf16 output (an fp32 residual stream under bf16 autocast): fused vs the alternatives."""
    names = ["slipstream fp32->bf16", "eager under autocast", "cast then bf16 eager"]
    table = Table(["M x N", "pass"] + [f"{k} ms" for k in names] + [f"{k} device ms" for k in names])
    for m, n in MIXED_SHAPES:
        x, w, b, dy = random_inputs(m, n, torch.float32, grad=True)

        def fused():
            return layer_norm(x, (n,), w, b, EPS, out_dtype=torch.bfloat16)

        def autocast_eager():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return F.layer_norm(x, (n,), w, b, EPS)

        def cast_then_eager():
            with torch.autocast("cuda", enabled=False):
                return F.layer_norm(x.to(torch.bfloat16), (n,), w.to(torch.bfloat16), b.to(torch.bfloat16), EPS)

        for pass_name in ("forward", "forward+backward"):
            calls = []
            for fn in (fused, autocast_eager, cast_then_eager):
                grad = dy.to(fn().dtype)
                calls.append(fn if pass_name == "forward" else
                             lambda fn=fn, grad=grad: torch.autograd.grad(fn(), (x, w, b), grad))
            table.add(f"{m}x{n}", pass_name, *(do_bench_median(c) for c in calls), *(device_ms([c]) for c in calls))
    report.append("### Mixed precision: fp32 input, bf16 output (ms)\n\n" + table.markdown())
    print(report[-1], flush=True)


def plot(rows: list[dict], path: str, how: str) -> None:
    """Bars of each implementation's fraction of copy bandwidth, one panel per (dtype, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [k for k in rows[0] if k not in ("dtype", "shape", "pass_name", "copy")]
    panels = sorted({(r["dtype"], r["pass_name"]) for r in rows}, key=lambda p: (p[0], p[1] != "forward"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (dtype, pass_name) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["dtype"] == dtype and r["pass_name"] == pass_name]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ax.bar([j + i * width for j in range(len(sel))], [r[impl] / r["copy"] for r in sel], width, label=impl)
        ax.axhline(0.9 if pass_name == "forward" else 0.7, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))], [r["shape"] for r in sel], fontsize=8)
        ax.set_ylabel("fraction of copy BW")
        ax.set_title(f"LayerNorm {pass_name}, {dtype} ({how})")
        ax.legend(fontsize=7, ncol=len(impls))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="also write the markdown section here")
    parser.add_argument("--plot", default=None, help="write PNGs of the peer comparison here (and *_device.png)")
    parser.add_argument("--tune", action="store_true", help="time candidate tilings of slipstream's kernels")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated subset of bf16,fp32")
    parser.add_argument("--workers", type=int, default=16, help="processes compiling tilings for --tune")
    args = parser.parse_args()
    dtype_names = args.dtypes.split(",")

    report = []
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    passed = correctness(report)
    compile_check(report)
    if args.tune:
        tune(report, dtype_names, args.workers)
    results = time_peers(report, copy_gbs, dtype_names)
    time_mixed(report)
    if args.plot:
        plot(results["do_bench"], args.plot, "do_bench, launch overhead included")
        plot(results["device"], args.plot.replace(".png", "_device.png"), "device time, CUDA graph")
    body = "\n\n".join(report) + ("" if passed else "\n\n**Correctness check FAILED: see the table.**")
    write_section(args.out, "Fused LayerNorm", environment_line(command_line()), body)


if __name__ == "__main__":
    main()
