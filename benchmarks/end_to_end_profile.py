"""Where a configuration's training step goes: torch.profiler over a few steps after the timed rounds.

Per configuration: the busiest operators and kernels, host time and GPU kernel time per step, and the
host syncs per step (a sync inside a step stops the host from queueing work ahead of the GPU, so
the step then costs host time plus GPU time instead of the larger of the two).
"""

from __future__ import annotations

import torch

from benchmarks.end_to_end_training import Trainee

__all__ = ["PROFILE_STEPS", "profile_trainee"]

PROFILE_STEPS = 3
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


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
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            trainee.step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    host_ms = sum(e.self_cpu_time_total for e in averages) / PROFILE_STEPS / 1e3
    device_ms = sum(e.self_device_time_total for e in averages) / PROFILE_STEPS / 1e3
    syncs = sum(e.count for e in averages if e.key in HOST_SYNCS) / PROFILE_STEPS
    host_to_device = sum(e.count for e in averages if e.key.startswith("Memcpy HtoD")) / PROFILE_STEPS
    summary = f"host {host_ms:.1f} ms/step"
    if cuda:
        summary += (
            f", GPU kernels {device_ms:.1f} ms/step, host syncs {syncs:.1f}/step, "
            f"host-to-device copies {host_to_device:.1f}/step"
        )
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    return f"{summary}\n\n```\n{table}\n```\n"
