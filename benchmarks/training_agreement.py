"""Whether training with slipstream's methods follows eager training, and if not, what departs.

The end-to-end benchmark has seen GPT-2 small with Fused LayerNorm + Low-Memory Dropout end far above
eager's loss. This trains the end-to-end benchmark's model (random weights, its batches, bf16
autocast, fused AdamW) for ``--steps`` steps in several runs from the same weights and batches:

* ``eager``; each method alone; both methods (cached eager launches, the default);
* both methods with Triton's own launch path (``slipstream.config.eager_launch = "triton"``);
* both methods with every op on its PyTorch fallback (``slipstream.ops.pytorch_fallback()``);
* both methods interleaved with an eager model, ten steps each in turn, as the end-to-end benchmark
  interleaves its configurations.

Every ``--check-every`` steps of the both-methods run, copies of its current model run one
forward+backward with the kernels and one on the fallbacks (same weights, same masks): whether the
kernels still agree with the PyTorch math on the weights training has produced.

Run (repo root, on a CUDA machine)::

    PYTHONPATH=. python benchmarks/training_agreement.py --out $OUT/training_agreement.md
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Optional, Sequence

import torch

from benchmarks.common import Table, command_line, eager_launch, environment_line, write_section
from benchmarks.end_to_end_models import MODELS
from benchmarks.end_to_end_training import Config, Trainee, batch_pool, discover_methods
from benchmarks.method_numerics import compare_model_with_fallback
from slipstream.ops import pytorch_fallback

BOTH = ("fused_layernorm", "low_memory_dropout")
#: run name -> (methods, eager launch path, every op on its fallback)
RUNS = {
    "eager": ((), "cached", False),
    "fused_layernorm": (("fused_layernorm",), "cached", False),
    "low_memory_dropout": (("low_memory_dropout",), "cached", False),
    "both": (BOTH, "cached", False),
    "both, Triton launch": (BOTH, "triton", False),
    "both, fallbacks": (BOTH, "cached", True),
}
INTERLEAVED = "both, interleaved with eager"
TURN = 10  # steps per turn when interleaving


def _trainee(model: str, methods: Sequence[str], launch: str, quick: bool, batches: list) -> Trainee:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Trainee(MODELS[model], Config(launch, tuple(methods), False, eager_launch=launch),
                   discover_methods(), batches, device, quick, seed=0)


def _steps(trainee: Trainee, count: int, fallback: bool) -> list[float]:
    with pytorch_fallback() if fallback else contextlib.nullcontext():
        return [float(trainee.step()) for _ in range(count)]


def run(model: str, steps: int, every: int, check_every: int, quick: bool) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = MODELS[model]
    batches = batch_pool(spec, quick, device)
    losses: dict[str, list[float]] = {}
    checks = Table(["step", "loss kernels / fallback", "grads rel. diff", "worst parameter", "its rel. diff",
                    "non-finite grads"])
    for name, (methods, launch, fallback) in RUNS.items():
        trainee = _trainee(model, methods, launch, quick, batches)
        losses[name] = []
        while len(losses[name]) < steps:
            if name == "both" and len(losses[name]) % check_every == 0:
                with eager_launch(launch):
                    r = compare_model_with_fallback(spec, trainee.model, batches[0], autocast=True)
                checks.add(len(losses[name]), f"{r['loss_kernels']:.4f} / {r['loss_fallback']:.4f}",
                           f"{r['grad_rel']:.2e}", r["worst_param"], f"{r['worst_rel']:.2e}", r["non_finite"])
            losses[name] += _steps(trainee, min(check_every, steps - len(losses[name])), fallback)
        print(name, [f"{v:.3f}" for v in losses[name]], flush=True)
        del trainee
    ours, theirs = _trainee(model, BOTH, "cached", quick, batches), _trainee(model, (), "cached", quick, batches)
    losses[INTERLEAVED] = []
    while len(losses[INTERLEAVED]) < steps:
        losses[INTERLEAVED] += _steps(ours, min(TURN, steps - len(losses[INTERLEAVED])), False)
        _steps(theirs, TURN, False)
    print(INTERLEAVED, [f"{v:.3f}" for v in losses[INTERLEAVED]], flush=True)
    curves = Table(["step", *losses])
    for i in range(every - 1, steps, every):
        curves.add(i + 1, *(f"{run_losses[i]:.4f}" for run_losses in losses.values()))
    return (f"### {model}: training loss (bf16 autocast, fused AdamW, same weights and batches)\n\n"
            f"{curves.markdown()}\n\nKernels against fallbacks on the both-methods run's current model "
            f"(one forward+backward of two copies, bf16 autocast):\n\n{checks.markdown()}\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "bert"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="report the loss every this many steps")
    parser.add_argument("--check-every", type=int, default=10, help="compare kernels with fallbacks this often")
    parser.add_argument("--quick", action="store_true", help="tiny model (a CPU smoke run)")
    parser.add_argument("--out", help="write the markdown results here")
    args = parser.parse_args(argv)
    body = run(args.model, args.steps, args.every, args.check_every, args.quick)
    write_section(args.out, "Training agreement", environment_line(command_line()), body)


if __name__ == "__main__":
    main()
