"""Trainer throughput and DDP scaling: ``examples/train_digits.py`` under torchrun on 1 and 2 GPUs.

Each configuration runs the example (plain and with slipstream methods) in a fresh torchrun job
with ``--nproc_per_node`` 1 and 2 and the same batch per GPU (weak scaling), reads the samples/s it
measured (median over epochs after the first), and reports scaling = 2-GPU / 1-GPU throughput.

Run on a machine with 2 GPUs:
    PYTHONPATH=. python benchmarks/trainer_scaling.py --out $OUT/trainer_scaling.md
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import Table, command_line, environment_line, write_section
from benchmarks.torchrun_launcher import REPO, run_torchrun

EXAMPLE = os.path.join(REPO, "examples", "train_digits.py")

#: (hidden width, batch per GPU): the example's own model, and a wider one with more work per step.
CONFIGS = [(256, 64), (4096, 256)]


def run_example(processes: int, hidden: int, batch: int, epochs: int) -> dict:
    """One torchrun job of the example; returns its results JSON."""
    return run_torchrun(EXAMPLE, ["--epochs", str(epochs), "--hidden", str(hidden), "--batch-size", str(batch)],
                        processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file to write (a .json with raw results beside it)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("trainer_scaling needs CUDA GPUs")
    process_counts = [n for n in (1, 2) if n <= gpus]
    table = Table(["hidden", "batch/GPU", "methods", "precision", "GPUs", "samples/s", "scaling", "efficiency",
                   "test acc", "fit s"])
    raw = []
    for hidden, batch in CONFIGS:
        single: dict[str, float] = {}
        for processes in process_counts:
            result = run_example(processes, hidden, batch, args.epochs)
            raw.append({"processes": processes, **result})
            for methods, run in result["runs"].items():
                speed = run["samples_per_s"]
                single.setdefault(methods, speed)
                scaling = speed / single[methods]
                table.add(hidden, batch, methods, result["precision"], processes, speed, scaling,
                          scaling / processes, run["accuracy"], run["fit_s"])

    body = (f"{args.epochs} epochs of scikit-learn digits (1,437 training images) per run, same batch per GPU; "
            "samples/s is the median over epochs after the first (evaluation excluded), summed over GPUs. "
            "scaling = samples/s on N GPUs / on 1 GPU; efficiency = scaling / N.\n\n" + table.markdown())
    write_section(args.out, "Trainer: DDP throughput and scaling (torchrun, 1 and 2 GPUs)",
                  environment_line(command_line()), body)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as file:
            json.dump(raw, file, indent=1)


if __name__ == "__main__":
    main()
