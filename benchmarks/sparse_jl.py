"""Seeded sparse JL on the GPU: correctness, then time and projection-state bytes against stored-S baselines.

For batch 4096, d in {4096, 16384, 65536}, k in {256, 1024, 4096}, bf16 and fp32, ``y = x @ S`` three ways:

* slipstream ``sparse_jl`` (S regenerated from an 8-byte seed inside the kernel);
* a dense matmul with ``S`` stored (``x @ S``, cuBLAS; fp32 with ``allow_tf32 = True``, as the kernel
  multiplies fp32 in tf32);
* ``torch.sparse`` with ``S`` stored as CSR.

All three use the same ``S`` (``sparse_jl_matrix``, density 1/2). Targets: slipstream within 1.3x of the
dense time and at least 5x faster than CSR, at every size. The backward (``dy @ S.T``) is timed
against the dense ``dy @ S.T`` as well.

``--sweep`` also times candidate tile shapes of the kernel at every size: the data behind the
defaults in ``slipstream/ops/kernels/sparse_jl.py``.

Run: ``python benchmarks/sparse_jl.py [--out docs/results/sparse_jl.md] [--json results.json] [--sweep]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch

from benchmarks.common import Table, command_line, do_bench_median, environment_line, rel_error, write_section
from benchmarks.layer_norm import device_ms
from slipstream.ops.kernels import sparse_jl as kernels
from slipstream.ops.sparse_jl import sparse_jl, sparse_jl_matrix, sparse_jl_reference, sparse_jl_transpose

BATCH = 4096
SIZES = [(d, k) for d in (4096, 16384, 65536) for k in (256, 1024, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SEED = 20240917
SPARSITY = 2
#: Largest relative error against float64 that passes (fp32 multiplies in tf32).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: Candidate tile shapes for ``--sweep``: (block_m, block_n, block_r, warps, stages); splits are added per size.
CANDIDATES = {
    (False, 16): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                  (256, 128, 64, 8, 3)],
    (False, 32): [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (256, 128, 64, 8, 2)],
    (True, 16): [(64, 64, 128, 8, 3), (128, 64, 128, 8, 3), (128, 64, 128, 4, 3)],
    (True, 32): [(64, 64, 128, 8, 3), (128, 64, 128, 8, 2)],
}


def poison_allocator(*shapes_dtypes) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so unwritten outputs show."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds: ``do_bench`` for fast calls, three CUDA-event timings for slow ones."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) < 50:
        return do_bench_median(fn)
    times = []
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Correctness


def check_correctness() -> Table:
    """Kernel forward and gradient against the float64 reference on the GPU: odd sizes, strides, both sparsities."""
    table = Table(["dtype", "sparsity", "shape (m, d, k)", "layout", "rel err y", "rel err dx", "pass"])
    cases = [(37, 150, 100), (300, 1000, 777), (4096, 4096, 256), (64, 65536, 1024)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for sparsity in (2, 8):
            for (m, d, k), strided in zip(cases, (False, True, False, False)):
                base = torch.randn(m, 2 * d if strided else d, device="cuda").to(dtype)
                x = (base[:, ::2] if strided else base).detach().requires_grad_()
                dy = torch.randn(m, k, device="cuda").to(dtype)
                poison_allocator(((m, k), dtype), ((m, d), dtype))
                y = sparse_jl(x, k, SEED, sparsity)
                (dx,) = torch.autograd.grad(y, x, dy)
                ref_y = sparse_jl_reference(x.detach().double(), k, SEED, sparsity)
                ref_dx = dy.double() @ sparse_jl_matrix(d, k, SEED, sparsity, dtype=torch.float64, device="cuda").T
                err_y, err_dx = rel_error(y, ref_y), rel_error(dx, ref_dx)
                ok = max(err_y, err_dx) < TOLERANCE[dtype]
                table.add(str(dtype).replace("torch.", ""), sparsity, f"({m}, {d}, {k})",
                          "strided" if strided else "contiguous", err_y, err_dx, "yes" if ok else "NO")
    return table


# ----------------------------------------------------------------------------------------------
# Timing against stored-S baselines


def csr_product(s_csr: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ S`` with ``S`` stored as CSR (``torch.mm(x, S)``, or ``(S.T @ x.T).T`` if that is unsupported)."""
    probe = torch.ones(2, s_csr.shape[0], dtype=s_csr.dtype, device="cuda")
    try:
        torch.mm(probe, s_csr)
        return lambda x: torch.mm(x, s_csr)
    except (RuntimeError, NotImplementedError):
        s_t = s_csr.t().to_sparse_csr()
        return lambda x: torch.mm(s_t, x.t()).t()


def csr_bytes(s_csr: torch.Tensor) -> int:
    parts = (s_csr.values(), s_csr.col_indices(), s_csr.crow_indices())
    return sum(p.numel() * p.element_size() for p in parts)


def time_case(d: int, k: int, dtype: torch.dtype) -> dict:
    """Times (ms) and projection-state bytes of the three ways, forward and backward."""
    x = torch.randn(BATCH, d, device="cuda").to(dtype)
    dy = torch.randn(BATCH, k, device="cuda").to(dtype)
    s = sparse_jl_matrix(d, k, SEED, SPARSITY, dtype=dtype, device="cuda")
    rows = slice(0, 256)  # check a row block against the stored-S product in fp32
    ref = x[rows].float() @ s.float()
    err = rel_error(sparse_jl(x, k, SEED, SPARSITY)[rows], ref)
    # Device time replays CUDA graphs over two input sets (so repeats do not run from L2 alone).
    xs, dys = [x, torch.randn_like(x)], [dy, torch.randn_like(dy)]
    result = dict(d=d, k=k, dtype=str(dtype), rel_err=err,
                  ours_ms=time_ms(lambda: sparse_jl(x, k, SEED, SPARSITY)),
                  dense_ms=time_ms(lambda: x @ s),
                  ours_device_ms=device_ms([lambda x=x: sparse_jl(x, k, SEED, SPARSITY) for x in xs]),
                  dense_device_ms=device_ms([lambda x=x: x @ s for x in xs]),
                  ours_bwd_ms=time_ms(lambda: sparse_jl_transpose(dy, d, SEED, SPARSITY)),
                  dense_bwd_ms=time_ms(lambda: dy @ s.T),
                  ours_bwd_device_ms=device_ms([lambda dy=dy: sparse_jl_transpose(dy, d, SEED, SPARSITY) for dy in dys]),
                  dense_bwd_device_ms=device_ms([lambda dy=dy: dy @ s.T for dy in dys]),
                  dense_bytes=s.numel() * s.element_size())
    try:
        s_csr = s.to_sparse_csr()
        product = csr_product(s_csr)
        result.update(csr_ms=time_ms(lambda: product(x)), csr_bytes=csr_bytes(s_csr))
    except (RuntimeError, NotImplementedError) as error:  # e.g. no CSR kernel for this dtype
        result.update(csr_ms=float("nan"), csr_bytes=0, csr_error=str(error).splitlines()[0][:120])
    return result


def results_tables(results: list[dict]) -> tuple[Table, Table]:
    """Forward and backward tables; the targets are judged on device time and on eager time."""
    forward = Table(["dtype", "d", "k", "slipstream ms (device / eager)", "dense ms (device / eager)", "CSR ms",
                     "vs dense (device / eager)", "CSR / slipstream", "state bytes: slipstream / dense / CSR",
                     "targets met (device / eager)", "rel err"])
    backward = Table(["dtype", "d", "k", "slipstream dy @ S.T ms (device / eager)", "dense dy @ S.T ms (device / eager)",
                      "vs dense (device / eager)"])
    for r in results:
        device, eager = r["ours_device_ms"] / r["dense_device_ms"], r["ours_ms"] / r["dense_ms"]
        vs_csr = r["csr_ms"] / r["ours_ms"]
        met = ["yes" if ratio <= 1.3 and vs_csr >= 5 else "NO" for ratio in (device, eager)]
        dtype = r["dtype"].replace("torch.", "")
        forward.add(dtype, r["d"], r["k"], f"{r['ours_device_ms']:.3g} / {r['ours_ms']:.3g}",
                    f"{r['dense_device_ms']:.3g} / {r['dense_ms']:.3g}", r["csr_ms"], f"{device:.2f}x / {eager:.2f}x",
                    f"{vs_csr:.0f}x", f"8 / {r['dense_bytes']:,} / {r['csr_bytes']:,}", " / ".join(met), r["rel_err"])
        backward.add(dtype, r["d"], r["k"], f"{r['ours_bwd_device_ms']:.3g} / {r['ours_bwd_ms']:.3g}",
                     f"{r['dense_bwd_device_ms']:.3g} / {r['dense_bwd_ms']:.3g}",
                     f"{r['ours_bwd_device_ms'] / r['dense_bwd_device_ms']:.2f}x / "
                     f"{r['ours_bwd_ms'] / r['dense_bwd_ms']:.2f}x")
    return forward, backward


# ----------------------------------------------------------------------------------------------
# Tile-shape sweep


def sweep(sm_count: int) -> Table:
    """Milliseconds of every candidate tile shape (with its split) at every size; the best is marked."""
    table = Table(["op", "dtype", "d", "k", "block_m, block_n, block_r, warps, stages", "split", "ms", "best"])
    for transposed in (False, True):
        for name, dtype in DTYPES.items():
            width = 32 if dtype == torch.float32 else 16
            for d, k in SIZES if not transposed else SIZES[::4]:
                a = torch.randn(BATCH, k if transposed else d, device="cuda").to(dtype)
                n, r = (d, k) if transposed else (k, d)
                scale = (SPARSITY / k) ** 0.5
                rows = []
                for shape in CANDIDATES[(transposed, width)]:
                    config = kernels.with_split(kernels.TileConfig(*shape), BATCH, n, r, sm_count)
                    ms = time_ms(lambda: kernels.launch_projection(a, n, SEED, SPARSITY, scale, transposed, config))
                    rows.append((shape, config.split, ms))
                best = min(ms for _, _, ms in rows)
                for shape, split, ms in rows:
                    table.add("transpose" if transposed else "project", name, d, k, ", ".join(map(str, shape)),
                              split, ms, "*" if ms == best else "")
                print(table.markdown().splitlines()[-1], flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown section here")
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile shapes")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # the dense fp32 baseline multiplies in tf32, like the kernel
    torch.manual_seed(0)
    env = environment_line(command_line())
    print(env, flush=True)

    correctness = check_correctness()
    print(correctness.markdown(), flush=True)
    results = []
    for name, dtype in DTYPES.items():
        for d, k in SIZES:
            results.append(time_case(d, k, dtype))
            torch.cuda.empty_cache()  # the case's stored S (up to 1.6 GB as CSR) is freed by now
            print(json.dumps(results[-1]), flush=True)
    forward, backward = results_tables(results)
    body = "\n\n".join([
        "Correctness (relative error against float64, GPU):", correctness.markdown(),
        f"Forward `y = x @ S`, batch {BATCH}, S of density 1/{SPARSITY} (dense fp32 baseline with "
        "`torch.backends.cuda.matmul.allow_tf32 = True`; slipstream fp32 multiplies in tf32). Device time: CUDA "
        "graph replay, launch overhead excluded; eager: `do_bench` median of the Python call, which includes "
        "it when the host is slower than the GPU:", forward.markdown(),
        "Backward `dx = dy @ S.T`:", backward.markdown(),
    ])
    if args.sweep:
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count
        body += "\n\nTile-shape sweep:\n\n" + sweep(sm_count).markdown()
    write_section(args.out, "Seeded sparse Johnson-Lindenstrauss transform", env, body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
