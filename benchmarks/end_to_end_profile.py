"""Where a configuration's training step goes: torch.profiler over a few steps after the timed rounds.

Per configuration: the busiest operators and kernels, host time and GPU kernel time per step, the
host syncs per step (a sync inside a step stops the host from queueing work ahead of the GPU, so
the step then costs host time plus GPU time instead of the larger of the two), and the GPU kernel
time per step by kind (:func:`kernel_category`), beside the step's wall time: the gap between the
two is time the GPU waited for the host.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from benchmarks.end_to_end_training import Trainee

__all__ = ["PROFILE_STEPS", "profile_trainee", "kernel_category"]

PROFILE_STEPS = 3
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


# (category, name fragments), first match wins; names are lower-cased first.
_CATEGORIES = (
    ("memcpy/memset", ("memcpy", "memset")),
    ("norm (ATen)", ("layer_norm", "layernorm", "group_norm", "groupnorm", "rowwisemoments", "gammabeta",
                     "computefusedparams", "compute1dbackward", "computebackwardfused")),
    ("dropout (ATen)", ("fused_dropout", "masked_scale", "bernoulli", "dropout")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("optimizer", ("multi_tensor", "adam")),
    ("casts/copies", ("copy_kernel", "direct_copy", "_to_copy", "bfloat16_copy", "float_copy")),
    ("matmul/conv", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "conv", "wgrad", "dgrad", "implicit")),
    ("inductor", ("triton_",)),
    ("elementwise/reduce (ATen)", ("elementwise", "reduce_kernel", "at::native")),
)


def _slipstream_kernel_names() -> frozenset[str]:
    """Names of our Triton kernels, as the profiler shows them."""
    from triton.runtime.jit import KernelInterface  # jitted and interpreted kernels alike

    from slipstream.ops.kernels import dropout, group_norm, layer_norm, sparse_jl

    return frozenset(name for module in (dropout, group_norm, layer_norm, sparse_jl)
                     for name, value in vars(module).items() if isinstance(value, KernelInterface))


def kernel_category(name: str, ours: frozenset[str] = frozenset()) -> str:
    """What a GPU kernel of ``name`` does, for the per-step breakdown; ``ours``: slipstream's kernel names.

    Example:
        >>> kernel_category("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>")
        'casts/copies'
        >>> kernel_category("_forward_rows_kernel", frozenset({"_forward_rows_kernel"}))
        'slipstream'
    """
    if name in ours:
        return "slipstream"
    lowered = name.lower()
    for category, fragments in _CATEGORIES:
        if any(f in lowered for f in fragments):
            return category
    return "other"


def _breakdown(events, steps: int, wall_ms: float) -> tuple[str, float]:
    """Markdown table of GPU kernel ms per step by category (calls per step, the total, the wall time); the total."""
    ours = _slipstream_kernel_names()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[kernel_category(event.name, ours)]
            entry[0] += event.device_time_total / 1e3 / steps
            entry[1] += 1 / steps
    busy = sum(ms for ms, _ in totals.values())
    rows = ["| kernels | GPU ms/step | calls/step |", "|---|---|---|"]
    rows += [f"| {name} | {ms:.2f} | {calls:.0f} |" for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    rows.append(f"| all kernels | {busy:.2f} | {sum(c for _, c in totals.values()):.0f} |")
    rows.append(f"| wall time of a step (profiled, synchronized) | {wall_ms:.2f} | |")
    return "\n".join(rows), busy


def profile_trainee(trainee: Trainee, rows: int = 15) -> str:
    """Markdown: a summary line and the top-``rows`` operator table of ``PROFILE_STEPS`` steps.

    Example:
        >>> text = profile_trainee(trainee)  # doctest: +SKIP
        >>> text.splitlines()[0]  # doctest: +SKIP
        'host 31.2 ms/step, GPU kernels 38.9 ms/step, host syncs 0.0/step, ...'
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = trainee.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            trainee.step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / PROFILE_STEPS
    averages = prof.key_averages()
    host_ms = sum(e.self_cpu_time_total for e in averages) / PROFILE_STEPS / 1e3
    syncs = sum(e.count for e in averages if e.key in HOST_SYNCS) / PROFILE_STEPS
    host_to_device = sum(e.count for e in averages if e.key.startswith("Memcpy HtoD")) / PROFILE_STEPS
    summary = f"host {host_ms:.1f} ms/step"
    if cuda:
        breakdown, device_ms = _breakdown(prof.events(), PROFILE_STEPS, wall_ms)
        summary += (
            f", GPU kernels {device_ms:.1f} ms/step, host syncs {syncs:.1f}/step, "
            f"host-to-device copies {host_to_device:.1f}/step"
        )
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    if cuda:
        summary += f"\n\n{breakdown}"
    return f"{summary}\n\n```\n{table}\n```\n"
