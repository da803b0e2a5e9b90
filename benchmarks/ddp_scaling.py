"""DDP scaling of end-to-end GPT-2 small (or BERT-base) training through slipstream.Trainer, 1 to 8 GPUs.

For every process count N of ``--nprocs`` (those the visible GPUs allow) and methods off and on,
one fresh torchrun job (``python -m torch.distributed.run --standalone``) runs
``benchmarks/ddp_scaling_worker.py``: the same model from the same seed, the same batch per GPU
(weak scaling), ``amp_bf16``, fused AdamW, ``--steps`` batches of which the first ``--warmup`` are
not timed. Methods on = Low Precision LayerNorm (``--norm fused``: Fused LayerNorm) and Low-Memory
Dropout. Reported per job: samples/s over all GPUs, efficiency = samples/s at N /
(N x samples/s at 1 with the same methods), the methods' speed-up at that N (on / off), and peak
``torch.cuda.max_memory_allocated``, the largest over the ranks. Every job keeps NVLink multicast off
(``benchmarks/torchrun_launcher.py``). Results are rewritten after every job, so a run cut short
keeps what it measured.

Run on a machine with GPUs (``--nprocs`` values above the GPU count are skipped and said so):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/ddp_scaling.py --nprocs 1,2,4,8 --out $OUT/ddp_scaling.md
CPU smoke run (gloo, a 2-layer GPT-2):
    PYTHONPATH=. python benchmarks/ddp_scaling.py --tiny --device cpu --nprocs 1,2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from typing import Optional

import torch

from benchmarks.common import Table, command_line, environment_line, write_section
from benchmarks.ddp_scaling_worker import PRECISION, add_run_arguments, check_run_arguments, run_arguments
from benchmarks.torchrun_launcher import REPO, run_torchrun

__all__ = ["parse_nprocs", "runnable_nprocs", "results_table", "error_summary", "main"]

WORKER = os.path.join(REPO, "benchmarks", "ddp_scaling_worker.py")
METHOD_CHOICES = {"on": ("on",), "off": ("off",), "both": ("off", "on")}
TARGET_EFFICIENCY = 0.9  # issue 11: at 8 GPUs with the methods on
GIB = 1024**3


def parse_nprocs(text: str) -> list[int]:
    """``'1,2,4,8'`` as ``[1, 2, 4, 8]`` (sorted, without repeats); anything else is a ValueError.

    Example:
        >>> parse_nprocs('2,1,2')
        [1, 2]
    """
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ValueError(f"--nprocs must be comma-separated positive ints like '1,2,4,8', got {text!r}") from None
    if counts[0] < 1:
        raise ValueError(f"--nprocs must be comma-separated positive ints like '1,2,4,8', got {text!r}")
    return counts


def runnable_nprocs(requested: list[int], device: str, gpus: int) -> tuple[list[int], list[int]]:
    """``requested`` split into (counts to run, counts skipped): on GPUs, one process per visible GPU.

    Example:
        >>> runnable_nprocs([1, 2, 4, 8], 'cuda', gpus=2)
        ([1, 2], [4, 8])
    """
    if device == "cpu":
        return list(requested), []
    return [n for n in requested if n <= gpus], [n for n in requested if n > gpus]


def _samples_per_s(results: list[dict], world_size: int, methods: str) -> Optional[float]:
    for result in results:
        if result["world_size"] == world_size and result["methods"] == methods:
            return result["samples_per_s"]
    return None


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> object:
    return "n/a" if numerator is None or denominator is None else numerator / denominator


def results_table(results: list[dict]) -> Table:
    """One row per job: throughput, efficiency vs N=1 (same methods), methods' speed-up, peak memory.

    Example:
        >>> row = {'world_size': 1, 'methods': 'on', 'samples_per_s': 10.0, 'items_per_sample': 512,
        ...        'unit': 'tok/s', 'step_ms_median': 1.0, 'peak_memory_bytes': [None], 'final_loss': 5.0}
        >>> results_table([row]).rows[0][:6]
        ['1', 'on', '10', '5120', '1', '1']
    """
    table = Table(["GPUs", "methods", "samples/s", "tok/s", "step ms (median)", "efficiency vs 1 GPU",
                   "methods speed-up", "peak GiB/GPU (max over ranks)", "final loss"])
    for result in results:
        n, methods, speed = result["world_size"], result["methods"], result["samples_per_s"]
        single = _samples_per_s(results, 1, methods)
        efficiency = _ratio(speed, None if single is None else n * single)
        speed_up = _ratio(_samples_per_s(results, n, "on"), _samples_per_s(results, n, "off"))
        peaks = [p for p in result["peak_memory_bytes"] if p is not None]
        table.add(n, methods, speed, speed * result["items_per_sample"], result["step_ms_median"], efficiency,
                  speed_up, max(peaks) / GIB if peaks else "n/a", result["final_loss"])
    return table


def _target_line(results: list[dict]) -> str:
    """Where the run stands against issue 11's target, from what was measured."""
    on = [r for r in results if r["methods"] == "on"]
    single = _samples_per_s(results, 1, "on")
    if not on or single is None:
        return "Target (efficiency >= 90% at 8 GPUs, methods on): not measurable from this run (needs N=1, methods on)."
    largest = max(r["world_size"] for r in on)
    efficiency = _samples_per_s(results, largest, "on") / (largest * single)
    verdict = "met" if efficiency >= TARGET_EFFICIENCY else "missed"
    scope = "" if largest == 8 else f" (largest N run: {largest}; the target is stated at 8)"
    return f"Target (efficiency >= 90% at 8 GPUs, methods on): {efficiency:.1%} at {largest} GPUs, {verdict}{scope}."


def _description(args: argparse.Namespace, results: list[dict], skipped: list[int], failed: list[str]) -> str:
    on = next((r for r in results if r["methods"] == "on"), None)
    methods = "none run" if on is None else ", ".join(
        f"{name} ({count} modules)" for name, count in on["modules_replaced"].items())
    size = "tiny (2 layers, width 64)" if args.tiny else "full size"
    tokens = results[0]["sample_shape"][-1] if results else "?"
    lines = [
        f"{args.model} {size}, random weights, {args.batch_per_gpu} sequences of {tokens} tokens per GPU per "
        f"step (weak scaling), {PRECISION}, fused AdamW; {args.steps} steps per job, the first {args.warmup} "
        f"untimed. Methods on: {methods}. One fresh torchrun job per row.",
        "samples/s = GPUs x batch per GPU x timed steps / their time (CUDA events at each step's end on rank 0, "
        "read back after training); efficiency = samples/s at N / (N x samples/s at 1 GPU, same methods); "
        "methods speed-up = samples/s on / off at the same N.",
    ]
    if skipped:
        lines.append(f"Not run: N = {', '.join(map(str, skipped))} (more than the {torch.cuda.device_count()} "
                     "visible GPUs).")
    lines += [f"Failed: {failure}" for failure in failed]
    lines.append(_target_line(results))
    return "\n\n".join(lines)


def _report(args: argparse.Namespace, counts: list[int], results: list[dict], skipped: list[int],
            failed: list[str]) -> None:
    where = "gloo on CPUs" if args.device == "cpu" else "NCCL on GPUs"
    title = f"Trainer: DDP scaling of {args.model} training (torchrun, {where}, N = {', '.join(map(str, counts))})"
    body = _description(args, results, skipped, failed)
    if results:
        body += "\n\n" + results_table(results).markdown()
    write_section(args.out, title, environment_line(command_line()), body)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as file:
            json.dump({"results": results, "failed": failed}, file, indent=1)


def _parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--nprocs", type=parse_nprocs, default=[1, 2, 4, 8], help="process counts, e.g. 1,2,4,8")
    parser.add_argument("--methods", choices=sorted(METHOD_CHOICES), default="both")
    parser.add_argument("--out", default=None, help="markdown file to write (a .json of raw results beside it)")
    parser.add_argument("--job-timeout", type=float, default=None, help="seconds one torchrun job may take")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run every (N, methods) job, report after each; returns the jobs' results.

    Example:
        >>> argv = ['--tiny', '--device', 'cpu', '--nprocs', '1,2', '--steps', '3', '--warmup', '1']
        >>> jobs = main(argv)  # doctest: +SKIP
        >>> [(job['world_size'], job['methods']) for job in jobs]   # doctest: +SKIP
        [(1, 'off'), (1, 'on'), (2, 'off'), (2, 'on')]
    """
    args = _parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        raise SystemExit("ddp_scaling needs CUDA GPUs (or --device cpu)")
    counts, skipped = runnable_nprocs(args.nprocs, args.device, gpus)
    if not counts:
        raise SystemExit(f"none of --nprocs {args.nprocs} fits the {gpus} visible GPUs")
    results: list[dict] = []
    failed: list[str] = []
    for n in counts:
        for methods in METHOD_CHOICES[args.methods]:
            worker_argv = [*run_arguments(args), "--methods", methods]
            try:
                results.append(run_torchrun(WORKER, worker_argv, n, timeout_s=args.job_timeout))
            except (RuntimeError, subprocess.TimeoutExpired) as error:  # report it, go on with the other jobs
                print(error, flush=True)
                failed.append(f"N = {n}, methods {methods}: {error_summary(str(error))}")
            _report(args, counts, results, skipped, failed)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results) + len(failed)} jobs failed")
    return results


# The line of a torchrun failure that names the cause: an exception's, or a rank killed by a signal.
_CAUSE = re.compile(r"^\s*(?:traceback : )?([\w.]+(?:Error|Exception|Expired|Interrupt): .*|Signal \d+ .*)$")


def error_summary(text: str) -> str:
    """The line of a failed job's error output that names its cause (the last such line), for the report.

    Example:
        >>> error_summary("Traceback (most recent call last):\\n  ValueError: bad batch\\n=====\\n")
        'ValueError: bad batch'
    """
    lines = [line for line in text.splitlines() if line.strip()]
    causes = [match.group(1) for match in map(_CAUSE.match, lines) if match]
    if causes:
        return causes[-1]
    plain = [line.strip() for line in lines if line.strip("=- ")]
    return plain[-1] if plain else "(no message)"


if __name__ == "__main__":
    main()
