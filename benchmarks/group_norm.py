"""GroupNorm on the GPU: slipstream's kernel against PyTorch eager, torch.compile and Liger-Kernel,
plus a timm ``resnet50_gn`` training step with and without Low Precision GroupNorm.

Run: ``PYTHONPATH=. python benchmarks/group_norm.py --out OUTDIR`` (writes ``group_norm.md``,
``group_norm.json`` and ``group_norm.png`` there, rewritten as each part finishes). ``--dtypes``,
``--impls``, ``--no-model``, ``--no-norms``, ``--phases``, ``--sweep`` and ``--sweep-rows`` choose the
parts; ``--settings NAME=INT,...`` overrides kernel settings and ``--sweep-setting NAME=V1,V2,...``
times each value of one. ``--run-case SHAPE:G:LAYOUT:DTYPE`` only runs one case's kernels, for a
profiler such as Nsight Compute (see :func:`run_case`).

Each timed call (forward, or forward + backward through ``torch.autograd.grad``) is captured in a
CUDA graph and its replays are timed with ``do_bench`` (median, L2 flushed before each replay), so
the numbers are GPU time, not Python launch overhead; every implementation is timed the same way.
The forward pass is the training one (inputs require grad). Effective bandwidth counts
2 x numel x element size forward and 5x forward + backward (see ``benchmarks/common.py``). Beside
the copy bandwidth (1 GiB copies), each case reports its size floor: the same bytes moved by plain
copy kernels at this size, one launch a pass (:func:`size_floor_gbs`).
``torch.compile`` compiles each case statically; its compile cache is warmed by parallel worker
processes first, which only shortens the run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing
import os
import statistics
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Table, command_line, copy_bandwidth_gbs, do_bench_median, environment_line, gbs, rel_error, write_section,
)
from slipstream.ops.group_norm import group_norm

SHAPES = [((16, 256, 64, 64), 32), ((8, 512, 32, 32), 32), ((4, 128, 128, 128), 32), ((2, 320, 96, 96), 32),
          ((32, 64, 56, 56), 8)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
IMPLS = ["slipstream", "eager", "compile", "liger"]
# Relative error allowed against float64 (outputs and dx), by dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
EPS = 1e-5
# do_bench budget per timing (ms): the replays are short, a few hundred fit.
WARMUP_MS, REP_MS = 10, 50
# Kernel settings the sweep tries (module constants of slipstream.ops.kernels.group_norm).
SWEEP_THREADS_AND_COMBINE = list(itertools.product([32, 64], [0, 512, 10**9]))
SWEEP_ROW_BYTES = [64, 256, 1 << 20]

Norm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(shape, dtype, layout, seed=0):
    """x (requires grad), weight, bias and dy on the GPU, random (never zeros)."""
    torch.manual_seed(seed)
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype).to(memory_format=LAYOUTS[layout]).requires_grad_()
    w = (torch.randn(shape[1], device="cuda") + 1).to(dtype).requires_grad_()
    b = torch.randn(shape[1], device="cuda").to(dtype).requires_grad_()
    return x, w, b, torch.randn_like(x)


def eager_norm(num_groups: int, silu: bool) -> Norm:
    def norm(x, w, b):
        y = F.group_norm(x, num_groups, w, b, EPS)
        return F.silu(y) if silu else y

    return norm


def _liger_function():
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception as error:  # not installed, or fails to import on this stack
        print(f"Liger-Kernel unavailable: {error!r}")
        return None
    return LigerGroupNormFunction


def make_norms(num_groups: int, silu: bool, impls: list[str]) -> dict[str, Norm]:
    """The implementations to compare, each ``(x, weight, bias) -> y``."""
    norms: dict[str, Norm] = {}
    if "slipstream" in impls:
        norms["slipstream"] = lambda x, w, b: group_norm(x, num_groups, w, b, EPS, "silu" if silu else None)
    if "eager" in impls:
        norms["eager"] = eager_norm(num_groups, silu)
    if "compile" in impls:
        norms["compile"] = torch.compile(eager_norm(num_groups, silu), dynamic=False)
    liger = _liger_function() if "liger" in impls else None
    if liger is not None:  # Liger has no fused activation: its norm, then PyTorch's SiLU

        def liger_norm(x, w, b):
            y = liger.apply(x, w, b, x.shape[1], num_groups, EPS)
            return F.silu(y) if silu else y

        norms["liger"] = liger_norm
    return norms


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after a warm-up run on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench(step: Callable[[], object]) -> float:
    return do_bench_median(graphed(step), warmup_ms=WARMUP_MS, rep_ms=REP_MS)


def _cases(dtypes: list[str]):
    for shape, num_groups in SHAPES:
        for dtype_name in dtypes:
            for layout in LAYOUTS:
                for silu in (False, True):
                    yield shape, num_groups, dtype_name, layout, silu


def _compile_case(case) -> None:
    """Worker process: compile and run one case once, filling torch.compile's on-disk caches."""
    shape, num_groups, dtype_name, layout, silu = case
    x, w, b, dy = make_inputs(shape, DTYPES[dtype_name], layout)
    norm = torch.compile(eager_norm(num_groups, silu), dynamic=False)
    torch.autograd.grad(norm(x, w, b), (x, w, b), dy)
    torch.cuda.synchronize()


def warm_compile_cache(dtypes: list[str], workers: int):
    """Start compiling every case in ``workers`` spawned processes; returns the pending result."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "2")  # the workers share the host's cores
    pool = multiprocessing.get_context("spawn").Pool(workers)
    result = pool.map_async(_compile_case, list(_cases(dtypes)))
    pool.close()
    return pool, result


def check(norm: Norm, x, w, b, dy, y64, dx64) -> tuple[float, float]:
    """Relative errors of ``y`` and ``dx`` against float64.

    A function of its own so that ``y`` and its autograd graph are gone before any graph capture: a
    live graph keeps the inputs' gradient accumulators, made on the default stream, and a capture on
    another stream that meets them is invalidated.
    """
    y = norm(x, w, b)
    return rel_error(y.detach(), y64.detach()), rel_error(torch.autograd.grad(y, x, dy)[0], dx64)


def size_floor_gbs(x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """Effective GB/s of the traffic floor at ``x``'s size: ``(forward, forward + backward)``.

    Forward: one copy of x (read x, write y). Forward + backward: that copy, then one elementwise
    kernel that reads x and dy and writes dx. The same bytes the effective bandwidth counts, moved
    by one launch a pass with no arithmetic, timed as the norms are: what any one-launch-a-pass
    GroupNorm could reach at this size, where the fixed cost of a launch is not small against the
    transfer (1 GiB copies measure the copy bandwidth).
    """
    source, grad = x.detach(), dy.detach()
    y, dx = torch.empty_like(source), torch.empty_like(source)
    nbytes = source.numel() * source.element_size()

    def forward_and_backward() -> None:
        y.copy_(source)
        torch.add(source, grad, out=dx)

    return gbs(2 * nbytes, bench(lambda: y.copy_(source))), gbs(5 * nbytes, bench(forward_and_backward))


def bench_norms(dtypes: list[str], impls: list[str], copy_gbs: float) -> list[dict]:
    results = []
    floors: dict[tuple, tuple[float, float]] = {}
    for shape, num_groups, dtype_name, layout, silu in _cases(dtypes):
        dtype = DTYPES[dtype_name]
        x, w, b, dy = make_inputs(shape, dtype, layout)
        if (shape, dtype_name, layout) not in floors:
            floors[shape, dtype_name, layout] = size_floor_gbs(x, dy)
        floor_fwd_gbs, floor_fwd_bwd_gbs = floors[shape, dtype_name, layout]
        x64 = x.detach().double().requires_grad_()
        y64 = eager_norm(num_groups, silu)(x64, w.detach().double(), b.detach().double())
        dx64 = torch.autograd.grad(y64, x64, dy.double())[0]
        y64 = y64.detach()
        nbytes = x.numel() * x.element_size()
        for name, norm in make_norms(num_groups, silu, impls).items():
            row = dict(shape=list(shape), groups=num_groups, dtype=dtype_name, layout=layout, silu=silu, impl=name)
            try:
                err_y, err_dx = check(norm, x, w, b, dy, y64, dx64)
                ms_f = bench(lambda: norm(x, w, b))
                ms_fb = bench(lambda: torch.autograd.grad(norm(x, w, b), (x, w, b), dy))
            except Exception as error:  # a peer that cannot run this case
                print(f"{row}: {error!r}")
                continue
            row.update(err_y=err_y, err_dx=err_dx, ok=max(err_y, err_dx) < TOLERANCE[dtype],
                       fwd_ms=ms_f, fwd_bwd_ms=ms_fb, fwd_gbs=gbs(2 * nbytes, ms_f), fwd_bwd_gbs=gbs(5 * nbytes, ms_fb))
            row["fwd_bwd_copy_frac"] = row["fwd_bwd_gbs"] / copy_gbs
            row.update(floor_fwd_gbs=floor_fwd_gbs, floor_fwd_bwd_gbs=floor_fwd_bwd_gbs)
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def norm_tables(results: list[dict], copy_gbs: float) -> str:
    """One table per pass: effective GB/s of each implementation, slipstream's share of copy bandwidth."""
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    cases = {}
    for r in results:
        cases.setdefault((tuple(r["shape"]), r["groups"], r["dtype"], r["layout"], r["silu"]), {})[r["impl"]] = r
    text = []
    for key, label in (("fwd_bwd", "forward + backward"), ("fwd", "forward")):
        table = Table(["shape", "G", "dtype", "layout", "SiLU", *[f"{i} GB/s" for i in impls],
                       "slipstream / copy", "size floor GB/s", "slipstream / floor", "x eager", "x best peer",
                       "max rel err"])
        for (shape, groups, dtype, layout, silu), by_impl in cases.items():
            ours = by_impl.get("slipstream")
            peers = [r[f"{key}_gbs"] for i, r in by_impl.items() if i != "slipstream"]
            eager = by_impl.get("eager")
            table.add(
                "x".join(map(str, shape)), groups, dtype, layout, "yes" if silu else "no",
                *[by_impl[i][f"{key}_gbs"] if i in by_impl else "n/a" for i in impls],
                f"{ours[f'{key}_gbs'] / copy_gbs:.0%}" if ours else "n/a",
                *_floor_cells(ours, key),
                ours[f"{key}_gbs"] / eager[f"{key}_gbs"] if ours and eager else "n/a",
                ours[f"{key}_gbs"] / max(peers) if ours and peers else "n/a",
                f"{max(ours['err_y'], ours['err_dx']):.1e}" + ("" if ours["ok"] else " FAIL") if ours else "n/a",
            )
        text.append(f"### {label}\n\n{table.markdown()}")
    return "\n\n".join(text)


def _floor_cells(ours: Optional[dict], key: str) -> list[object]:
    """The size floor's GB/s and slipstream's share of it (n/a for results saved before floors existed)."""
    floor = ours.get(f"floor_{key}_gbs") if ours else None
    return [floor, f"{ours[f'{key}_gbs'] / floor:.0%}"] if floor else ["n/a", "n/a"]


def sweep_strategies() -> str:
    """Time each pass under the fused barrier and as two passes; keep the best ``TWO_PASS_MAX_BYTES``.

    Every benchmark shape, both layouts, bf16 and fp32, no activation, kernels alone. A pass re-reads
    x (forward) or x and dy (backward); the threshold chosen is the one (of 0 and each pass's re-read
    bytes) that gives the best geometric mean of forward + backward time over the cases.
    """
    from slipstream.ops.kernels import group_norm as kernels

    forced = {"fused": 0, "two_pass": 1 << 62}
    cases = []
    for (shape, num_groups), dtype_name, layout in itertools.product(SHAPES, ["bf16", "fp32"], list(LAYOUTS)):
        x, w, b, dy = (t.detach() for t in make_inputs(shape, DTYPES[dtype_name], layout))
        times = {}
        for strategy, threshold in forced.items():
            kernels.TWO_PASS_MAX_BYTES = threshold
            y, mean, rstd = kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)
            times[strategy] = (bench(lambda: kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)),
                               bench(lambda: kernels.backward(dy, x, w, b, mean, rstd, num_groups, False)))
        nbytes = x.numel() * x.element_size()
        cases.append(("x".join(map(str, shape)), num_groups, dtype_name, layout, nbytes, times))
        print(cases[-1], flush=True)

    def geomean_ms(threshold: int) -> float:
        total = 0.0
        for *_, nbytes, times in cases:
            fwd = times["two_pass" if nbytes <= threshold else "fused"][0]
            bwd = times["two_pass" if 2 * nbytes <= threshold else "fused"][1]
            total += math.log(fwd + bwd)
        return math.exp(total / len(cases))

    candidates = sorted({0} | {m * c[4] for c in cases for m in (1, 2)})
    best = min(candidates, key=geomean_ms)
    kernels.TWO_PASS_MAX_BYTES = best
    table = Table(["shape", "G", "dtype", "layout", "MiB", "fwd fused us", "fwd two-pass us", "bwd fused us",
                   "bwd two-pass us"])
    for shape, groups, dtype_name, layout, nbytes, times in cases:
        table.add(shape, groups, dtype_name, layout, nbytes / 2**20, 1e3 * times["fused"][0],
                  1e3 * times["two_pass"][0], 1e3 * times["fused"][1], 1e3 * times["two_pass"][1])
    chosen = (f"Chosen: TWO_PASS_MAX_BYTES={best} ({best / 2**20:.1f} MiB; geometric mean of forward + backward "
              f"{1e3 * geomean_ms(best):.1f} us, against {1e3 * geomean_ms(0):.1f} us always fused and "
              f"{1e3 * geomean_ms(1 << 62):.1f} us always two passes), used for everything below.")
    print(chosen, flush=True)
    return f"### Fused barrier or two passes (kernels alone, no activation)\n\n{table.markdown()}\n\n{chosen}"


PHASE_REPEATS = 20


def phase_times(copy_gbs: float) -> str:
    """GPU time of each pass of the three-pass kernels (torch.profiler), against copy bandwidth.

    Forcing three passes separates what a fused launch does in one: the statistics pass (read x, or
    x and dy; reduce) and the apply pass (read again, normalize, write). Each pass's bandwidth is
    its fewest bytes (stats: 1x forward, 2x backward; apply: 2x and 3x numel x element size) over
    its time, as a fraction of the copy bandwidth measured in the same run. bf16, no activation.
    """
    from torch.profiler import ProfilerActivity, profile

    from slipstream.ops.kernels import group_norm as kernels

    saved = kernels.TWO_PASS_MAX_BYTES, kernels.TWO_PASS_MAX_SET
    table = Table(["shape", "G", "layout", "fwd stats us (/copy)",
                   "fwd apply us (/copy)", "bwd stats us (/copy)", "bwd apply us (/copy)"])
    kernels.TWO_PASS_MAX_BYTES, kernels.TWO_PASS_MAX_SET = 1 << 62, 0
    try:
        for (shape, num_groups), layout in itertools.product(SHAPES, list(LAYOUTS)):
            x, w, b, dy = (t.detach() for t in make_inputs(shape, torch.bfloat16, layout))
            nbytes = x.numel() * x.element_size()

            def run():
                y, mean, rstd = kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)
                kernels.backward(dy, x, w, b, mean, rstd, num_groups, False)

            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(PHASE_REPEATS):
                    run()
                torch.cuda.synchronize()
            times: dict[str, list[float]] = {}
            for event in sorted(prof.events(), key=lambda e: e.time_range.start):  # launch order
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    times.setdefault(event.name, []).append(event.device_time_total)
            fwd, bwd = times.get("_forward_kernel", []), times.get("_backward_kernel", [])
            if len(fwd) != 2 * PHASE_REPEATS or len(bwd) != 2 * PHASE_REPEATS:  # a set of one program
                continue
            row = [statistics.median(fwd[0::2]), statistics.median(fwd[1::2]),
                   statistics.median(bwd[0::2]), statistics.median(bwd[1::2])]
            moved = [1, 2, 2, 3]  # multiples of numel x element size
            table.add("x".join(map(str, shape)), num_groups, layout,
                      *[f"{us:.1f} ({gbs(m * nbytes, us / 1e3) / copy_gbs:.0%})" for us, m in zip(row, moved)])
            print(table.rows[-1], flush=True)
    finally:
        kernels.TWO_PASS_MAX_BYTES, kernels.TWO_PASS_MAX_SET = saved
    return f"### Each pass on its own (three passes forced, bf16, no activation)\n\n{table.markdown()}"


def _kernel_times(shape, num_groups: int, layout: str) -> tuple[float, float]:
    """Median ms of the forward and the backward kernels alone (bf16, no activation)."""
    from slipstream.ops.kernels import group_norm as kernels

    x, w, b, dy = (t.detach() for t in make_inputs(shape, torch.bfloat16, layout))
    y, mean, rstd = kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)
    return (bench(lambda: kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)),
            bench(lambda: kernels.backward(dy, x, w, b, mean, rstd, num_groups, False)))


def _geomean_gbs(cases: list[tuple[tuple[int, ...], float, float]]) -> float:
    """Geometric mean of forward + backward effective GB/s over ``(shape, fwd ms, bwd ms)`` (bf16)."""
    rates = [gbs(5 * math.prod(shape) * 2, fwd + bwd) for shape, fwd, bwd in cases]
    return math.exp(sum(map(math.log, rates)) / len(rates))


def sweep(copy_gbs: float) -> str:
    """Time the kernels under each setting to sweep (bf16, no activation); keep the fastest settings.

    Settings are chosen by the geometric mean of forward + backward bandwidth over the benchmark's
    shapes: threads per program and when the last program of a set combines (all layouts); then
    :func:`sweep_rows` chooses the shortest row run of a channels_last tile.
    """
    from slipstream.ops.kernels import group_norm as kernels

    table = Table(["ELEMENTS_PER_THREAD", "LAST_COMBINE_MIN_PARTIALS", "fwd+bwd GB/s (geomean)", "/ copy"])
    best = None
    for threads, combine in SWEEP_THREADS_AND_COMBINE:
        kernels.ELEMENTS_PER_THREAD, kernels.LAST_COMBINE_MIN_PARTIALS = threads, combine
        rate = _geomean_gbs([(shape, *_kernel_times(shape, groups, layout))
                             for (shape, groups), layout in itertools.product(SHAPES, LAYOUTS)])
        table.add(threads, combine, rate, rate / copy_gbs)
        print(table.rows[-1], flush=True)
        best = max(best or (rate, threads, combine), (rate, threads, combine))
    kernels.ELEMENTS_PER_THREAD, kernels.LAST_COMBINE_MIN_PARTIALS = best[1], best[2]
    chosen = f"Chosen: ELEMENTS_PER_THREAD={best[1]}, LAST_COMBINE_MIN_PARTIALS={best[2]} (used for everything below)."
    print(chosen, flush=True)
    return (f"### Kernel settings sweep (bf16, no activation, kernels alone)\n\n{table.markdown()}\n\n{chosen}\n\n"
            + sweep_rows(copy_gbs))


def sweep_rows(copy_gbs: float) -> str:
    """:func:`sweep_setting` of the shortest row run of a channels_last tile, on channels_last inputs."""
    return sweep_setting(copy_gbs, "MIN_RUN_BYTES", SWEEP_ROW_BYTES, ["channels_last"])


def sweep_setting(copy_gbs: float, name: str, values: list[int], layouts: list[str]) -> str:
    """Time the kernels under each value of the kernel setting ``name``; keep the fastest value.

    bf16, no activation, kernels alone, each benchmark shape in each of ``layouts``; a table of every
    case's forward and backward times, and the value chosen by the geometric mean of forward +
    backward bandwidth.
    """
    from slipstream.ops.kernels import group_norm as kernels

    cases = [(shape, groups, layout) for (shape, groups), layout in itertools.product(SHAPES, layouts)]
    by_value = {}
    for value in values:
        setattr(kernels, name, value)
        by_value[value] = [(shape, *_kernel_times(shape, groups, layout)) for shape, groups, layout in cases]
        print(name, value, by_value[value], flush=True)
    table = Table(["shape", "G", "layout", *[f"{value}: fwd us / bwd us (/copy)" for value in values]])
    for i, (shape, groups, layout) in enumerate(cases):
        cells = []
        for value in values:
            _, fwd, bwd = by_value[value][i]
            cells.append(f"{1e3 * fwd:.1f} / {1e3 * bwd:.1f} ({_geomean_gbs([by_value[value][i]]) / copy_gbs:.0%})")
        table.add("x".join(map(str, shape)), groups, layout, *cells)
    means = {value: _geomean_gbs(timed) for value, timed in by_value.items()}
    table.add("geomean", "", "", *[f"{means[value]:.0f} GB/s ({means[value] / copy_gbs:.0%})" for value in values])
    best = max(means, key=means.get)
    setattr(kernels, name, best)
    chosen = f"Chosen: {name}={best} (used for everything below)."
    print(chosen, flush=True)
    return (f"### {name} (bf16, no activation, kernels alone; forward + backward share of copy in brackets)\n\n"
            f"{table.markdown()}\n\n{chosen}")


def _setting_values(text: str) -> tuple[str, list[int]]:
    """``"NAME=V1,V2"`` (``--sweep-setting``) as ``(NAME, [V1, V2])``."""
    name, _, values = text.partition("=")
    try:
        return name, [int(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep-setting: {text!r} is not NAME=INT,INT,...") from None


def time_training_step(model, x, target, steps: int) -> tuple[float, float]:
    """Median ms of an AdamW training step under bf16 autocast (after 5 warm-up steps), and peak GiB."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def resnet50_gn_step(batch: int = 64, steps: int = 20) -> str:
    """timm resnet50_gn training step (bf16 autocast, channels_last, AdamW): eager vs LP GroupNorm."""
    import timm
    from torch import nn

    import slipstream.functional as sf
    from slipstream.nn import LPGroupNorm

    torch.manual_seed(0)
    base = timm.create_model("resnet50_gn", num_classes=1000).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    table = Table(["model", "GroupNorms swapped", "step ms (median)", "speed-up", "peak memory GiB",
                   "logits rel. diff vs eager"])
    eager_ms, eager_logits = None, None
    for variant in ("eager", "LP GroupNorm"):
        model = copy.deepcopy(base)
        swapped = "-"
        if variant != "eager":
            total = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
            replaced = sf.apply_low_precision_groupnorm(model, precision="amp_bf16")
            left = sum(isinstance(m, nn.GroupNorm) and not isinstance(m, LPGroupNorm) for m in model.modules())
            swapped = f"{len(replaced)} of {total}" + ("" if left == 0 else f" ({left} left)")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).float()
        ms, peak = time_training_step(model, x, target, steps)
        if eager_ms is None:
            eager_ms, eager_logits = ms, logits
        table.add(f"resnet50_gn b{batch} {variant}", swapped, ms, eager_ms / ms, peak, rel_error(logits, eager_logits))
        print(table.rows[-1], flush=True)
        del model  # the next variant's peak memory must not include this one
        torch.cuda.empty_cache()
    return table.markdown()


def plot(results: list[dict], copy_gbs: float, path: str) -> None:
    """Forward + backward effective bandwidth as a fraction of copy bandwidth, one panel per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in results)]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(14, 4.5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        rows = [r for r in results if r["dtype"] == dtype and not r["silu"]]
        label = lambda r: f"{'x'.join(map(str, r['shape']))}\nG={r['groups']} {r['layout']}"  # noqa: E731
        labels = list(dict.fromkeys(label(r) for r in rows))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            values = {label(r): r["fwd_bwd_copy_frac"] for r in rows if r["impl"] == impl}
            ax.bar([i + k * width for i in range(len(labels))], [values.get(lbl, 0) for lbl in labels], width,
                   label=impl)
        ax.axhline(0.7, color="gray", linestyle="--", linewidth=1, label="70% of copy")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("fraction of copy bandwidth")
        ax.set_title(f"GroupNorm forward + backward, {dtype}, no activation (copy {copy_gbs:.0f} GB/s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_case(text: str) -> tuple[tuple[int, ...], int, str, str]:
    """``"16x256x64x64:32:channels_last:bf16"`` (``--run-case``) as ``(shape, groups, layout, dtype)``."""
    try:
        shape_text, groups, layout, dtype = text.split(":")
        shape = tuple(int(d) for d in shape_text.split("x"))
        groups = int(groups)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--run-case: {text!r} is not SHAPE:G:LAYOUT:DTYPE, e.g. "
                                         "16x256x64x64:32:channels_last:bf16") from None
    if len(shape) < 3 or layout not in LAYOUTS or dtype not in DTYPES or shape[1] % groups:
        raise argparse.ArgumentTypeError(f"--run-case: {text!r}: SHAPE is N x C x spatial dims, G divides C, LAYOUT "
                                         f"one of {', '.join(LAYOUTS)}, DTYPE one of {', '.join(DTYPES)}")
    return shape, groups, layout, dtype


def run_case(case: tuple[tuple[int, ...], int, str, str], repeats: int = 3) -> None:
    """Run one case's forward and backward kernels ``repeats`` times, plainly (no CUDA graph, no
    timing): a target for Nsight Compute, e.g.
    ``ncu --clock-control none --kernel-name regex:_forward_kernel|_backward_kernel --launch-skip 2
    python benchmarks/group_norm.py --run-case 16x256x64x64:32:channels_last:bf16``."""
    from slipstream.ops.kernels import group_norm as kernels

    shape, num_groups, layout, dtype = case
    x, w, b, dy = (t.detach() for t in make_inputs(shape, DTYPES[dtype], layout))
    for _ in range(repeats):
        y, mean, rstd = kernels.forward(x, w, b, num_groups, EPS, False, x.dtype)
        kernels.backward(dy, x, w, b, mean, rstd, num_groups, False)
    torch.cuda.synchronize()


def _integer_settings() -> list[str]:
    """Names of the kernel module's integer settings (its upper-case int constants)."""
    from slipstream.ops.kernels import group_norm as kernels

    return sorted(name for name, value in vars(kernels).items() if name.isupper() and type(value) is int)


def apply_settings(text: str) -> None:
    """Set kernel module constants from ``"NAME=INT,NAME=INT"`` (``--settings``)."""
    from slipstream.ops.kernels import group_norm as kernels

    allowed = _integer_settings()
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in allowed or not value.lstrip("-").isdigit():
            raise SystemExit(f"--settings: {item!r} is not NAME=INT with NAME one of {', '.join(allowed)}")
        setattr(kernels, name, int(value))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for group_norm.md/.json/.png")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of " + ",".join(DTYPES))
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    parser.add_argument("--no-norms", action="store_true", help="skip the norm tables")
    parser.add_argument("--no-model", action="store_true", help="skip the resnet50_gn step")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep the kernel strategy and settings first and use the best")
    parser.add_argument("--sweep-rows", action="store_true",
                        help="sweep only the shortest row run of channels_last tiles first and use the best")
    parser.add_argument("--sweep-setting", type=_setting_values, action="append", default=[],
                        metavar="NAME=V1,V2,...",
                        help="time the kernels (both layouts) under each value of a kernel setting first and "
                             "use the best; may repeat")
    parser.add_argument("--phases", action="store_true",
                        help="time each pass of the kernels on its own (a profile, three passes forced), "
                             "after any sweep")
    parser.add_argument("--settings", default="",
                        help="comma list of NAME=INT kernel settings (module constants of "
                             "slipstream.ops.kernels.group_norm) to use instead of the defaults")
    parser.add_argument("--run-case", type=parse_case, metavar="SHAPE:G:LAYOUT:DTYPE",
                        help="only run this case's kernels a few times (bf16 or fp32, no activation), for a profiler")
    parser.add_argument("--compile-workers", type=int, default=8, help="processes warming torch.compile's cache")
    args = parser.parse_args(argv)
    dtypes, impls = args.dtypes.split(","), args.impls.split(",")
    apply_settings(args.settings)
    unknown = [name for name, _ in args.sweep_setting if name not in _integer_settings()]
    if unknown:
        raise SystemExit(f"--sweep-setting: {', '.join(unknown)} not one of {', '.join(_integer_settings())}")
    if args.run_case:
        run_case(args.run_case)
        return
    torch._dynamo.config.cache_size_limit = 256  # one static compile per case
    warming = None
    if not args.no_norms and "compile" in impls and args.compile_workers > 0:
        warming = warm_compile_cache(dtypes, args.compile_workers)
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    body = [f"Copy bandwidth (read + write) measured in this run: {copy_gbs:.0f} GB/s."]
    results: list[dict] = []

    def write() -> None:  # after every part, so a cut-off run still leaves what it measured
        out_md = None
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            out_md = os.path.join(args.out, "group_norm.md")
            with open(os.path.join(args.out, "group_norm.json"), "w") as f:
                json.dump(dict(copy_gbs=copy_gbs, results=results), f)
            if results:
                plot(results, copy_gbs, os.path.join(args.out, "group_norm.png"))
        tables = [norm_tables(results, copy_gbs)] if results else []
        write_section(out_md, "GroupNorm", environment_line(command_line()), "\n\n".join(body + tables))

    if args.sweep:
        body.append(sweep_strategies())
        write()
        body.append(sweep(copy_gbs))
        write()
    elif args.sweep_rows:
        body.append(sweep_rows(copy_gbs))
        write()
    for name, values in args.sweep_setting:
        body.append(sweep_setting(copy_gbs, name, values, list(LAYOUTS)))
        write()
    if args.phases:
        body.append(phase_times(copy_gbs))
        write()
    if warming is not None:  # before the model step, whose eager timing shares the host's cores
        pool, pending = warming
        pending.wait()
        pool.join()
    if not args.no_model:
        body.append("### timm resnet50_gn training step (bf16 autocast, channels_last, AdamW)\n\n" + resnet50_gn_step())
        write()
    for dtype in dtypes if not args.no_norms else []:
        results += bench_norms([dtype], impls, copy_gbs)
        write()


if __name__ == "__main__":
    main()
