"""Run a benchmark script as a fresh torchrun job and read back the JSON its rank 0 wrote.

The script must accept ``--results PATH`` and write its results there as JSON (rank 0). Every job
runs with NVLink multicast off in NCCL, PyTorch and NVSHMEM: on the shared multi-GPU machines a
program that uses it can put the host's GPUs out of service, so the variables are forced here even
where the caller's environment says otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Mapping, Optional, Sequence

__all__ = ["REPO", "MULTICAST_OFF", "job_environment", "run_torchrun"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def job_environment(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This process's environment plus ``extra``, the repository on ``PYTHONPATH``, multicast off.

    Example:
        >>> job_environment({'NCCL_NVLS_ENABLE': '1'})['NCCL_NVLS_ENABLE']   # multicast stays off
        '0'
    """
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.update(MULTICAST_OFF)
    return env


def run_torchrun(script: str, script_args: Sequence[str], processes: int,
                 extra_env: Optional[Mapping[str, str]] = None, timeout_s: Optional[float] = None) -> dict:
    """Run ``script`` under ``torchrun --standalone --nproc_per_node processes``; return its results JSON.

    The script's output is printed; a job that fails raises a RuntimeError with the end of its
    error output; one that runs past ``timeout_s`` is killed, every rank of it, and raises
    ``subprocess.TimeoutExpired``.

    Example:
        >>> run_torchrun('examples/train_digits.py', ['--epochs', '2'], processes=2)['precision']  # doctest: +SKIP
        'amp_bf16'
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "results.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), script, *script_args, "--results", results]
        job = subprocess.Popen(command, env=job_environment(extra_env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = job.communicate(timeout=timeout_s)
        except BaseException:
            _stop(job)
            raise
        print(stdout, end="", flush=True)
        if job.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-4000:]}")
        with open(results) as file:
            return json.load(file)


def _stop(job: subprocess.Popen, grace_s: float = 30.0) -> None:
    """End a torchrun job with all of its ranks.

    The ranks run in sessions of their own, so only the torchrun agent can reach them: SIGTERM makes
    it stop them; it is killed outright if it has not finished after ``grace_s``.
    """
    job.terminate()
    try:
        job.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
