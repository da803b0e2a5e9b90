"""Do slipstream's kernels change a real model's math? Kernels against their PyTorch fallbacks, on a GPU.

For each set of methods applied to a model of the end-to-end benchmark (GPT-2 small by default):

1. One forward+backward with the Triton kernels and one with every op on its PyTorch fallback
   (:func:`slipstream.ops.pytorch_fallback`) from identical copies of the model (same weights, same
   dropout seeds, hence the same masks), in fp32 and under bf16 autocast. Reports the relative
   difference of the loss and of all gradients together, the worst single parameter, and
   non-finite values. The fallbacks are the kernels' reference, so a kernel bug shows as a
   difference far above rounding (fp32: about 1e-6; bf16: about 1e-2).
2. A short training run per method set (bf16 autocast, fused AdamW, the benchmark's batches) and its
   loss every few steps next to the eager model's, so a divergence is seen where it starts.

Run (repo root, on a CUDA machine)::

    PYTHONPATH=. python benchmarks/method_numerics.py --out $OUT/method_numerics.md
    PYTHONPATH=. python benchmarks/method_numerics.py --models gpt2,bert --steps 40
    PYTHONPATH=. python benchmarks/method_numerics.py --quick          # CPU smoke run (tiny models)
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Optional, Sequence

import torch

from benchmarks.common import Table, command_line, environment_line, write_section
from benchmarks.end_to_end_models import MODELS, ModelSpec
from benchmarks.end_to_end_training import Config, Trainee, apply_method, batch_pool, discover_methods
from slipstream.ops import pytorch_fallback

METHOD_SETS = {
    "gpt2": [("fused_layernorm",), ("low_memory_dropout",), ("fused_layernorm", "low_memory_dropout")],
    "bert": [("fused_layernorm",), ("low_memory_dropout",), ("fused_layernorm", "low_memory_dropout")],
    "convnext_tiny": [("fused_layernorm",), ("low_precision_layernorm",)],
    "unet": [("fused_groupnorm",), ("low_precision_groupnorm",)],
    "resnet50_gn": [("fused_groupnorm",), ("low_precision_groupnorm",)],
}


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}


def _forward_backward(spec: ModelSpec, model: torch.nn.Module, batch: dict, autocast: bool) -> float:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout left to torch (nn.Dropout, SDPA's) draws the same masks in both passes
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = spec.loss(model, batch)
    loss.backward()
    return float(loss)


def compare_kernels_with_fallback(
    spec: ModelSpec, methods: Sequence[str], batch: dict, device: torch.device, quick: bool, autocast: bool
) -> dict[str, object]:
    """One forward+backward with kernels and one on the fallbacks, from identical model copies."""
    torch.manual_seed(0)
    with device:
        model = spec.build(quick)
    model.train()
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    found = discover_methods()
    for name in methods:
        apply_method(model, found[name], seed=0)
    return compare_model_with_fallback(spec, model, batch, autocast)


def compare_model_with_fallback(spec: ModelSpec, model: torch.nn.Module, batch: dict,
                                autocast: bool) -> dict[str, object]:
    """One forward+backward of two copies of ``model`` (left untouched): kernels, then fallbacks."""
    model, twin = copy.deepcopy(model), copy.deepcopy(model)  # same weights and seed streams: same masks
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG streams go on as if this had not run
        loss_kernels = _forward_backward(spec, model, batch, autocast)
        with pytorch_fallback():
            loss_fallback = _forward_backward(spec, twin, batch, autocast)
    got, want = _gradients(model), _gradients(twin)
    diff = math.sqrt(sum(float((got[k] - want[k]).square().sum()) for k in want))
    norm = math.sqrt(sum(float(want[k].square().sum()) for k in want))
    worst = max(want, key=lambda k: float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)))
    return {
        "loss_kernels": loss_kernels,
        "loss_fallback": loss_fallback,
        "grad_rel": diff / max(norm, 1e-30),
        "worst_param": worst,
        "worst_rel": float((got[worst] - want[worst]).norm() / want[worst].norm().clamp_min(1e-30)),
        "non_finite": sum(int((~torch.isfinite(g)).sum()) for g in got.values()),
    }


def training_losses(
    spec: ModelSpec, methods: Sequence[str], device: torch.device, quick: bool, steps: int, every: int
) -> list[float]:
    """Losses every ``every`` steps of ``steps`` eager training steps with ``methods`` applied."""
    batches = batch_pool(spec, quick, device)
    trainee = Trainee(spec, Config("+".join(methods) or "eager", tuple(methods), False),
                      discover_methods(), batches, device, quick, seed=0)
    losses = [trainee.step() for _ in range(steps)]
    return [float(losses[i]) for i in range(every - 1, steps, every)]


def run(models: Sequence[str], steps: int, every: int, quick: bool) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = set(discover_methods())
    parts = []
    for name in models:
        spec = MODELS[name]
        method_sets = [m for m in METHOD_SETS[name] if set(m) <= available]
        batch = batch_pool(spec, quick, device, count=1)[0]
        table = Table(["methods", "precision", "loss (kernels)", "loss (fallback)", "grads rel. diff",
                       "worst parameter", "its rel. diff", "non-finite grads"])
        for methods in method_sets:
            for autocast in (False, True):
                r = compare_kernels_with_fallback(spec, methods, batch, device, quick, autocast)
                table.add("+".join(methods), "bf16 autocast" if autocast else "fp32", f"{r['loss_kernels']:.6f}",
                          f"{r['loss_fallback']:.6f}", f"{r['grad_rel']:.2e}", r["worst_param"],
                          f"{r['worst_rel']:.2e}", r["non_finite"])
                print(f"{name} {'+'.join(methods)} autocast={autocast}: {r}", flush=True)
        curves = Table(["step", "eager", *("+".join(m) for m in method_sets)])
        runs = [training_losses(spec, (), device, quick, steps, every)]
        runs += [training_losses(spec, m, device, quick, steps, every) for m in method_sets]
        for i, losses in enumerate(zip(*runs)):
            curves.add((i + 1) * every, *(f"{v:.4f}" for v in losses))
        parts.append(f"### {name}\n\nKernels against fallbacks, one forward+backward:\n\n{table.markdown()}\n\n"
                     f"Training loss (eager, bf16 autocast, fused AdamW):\n\n{curves.markdown()}\n")
        print(parts[-1], flush=True)
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2", help=f"comma-separated, from {', '.join(METHOD_SETS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke run)")
    parser.add_argument("--out", help="write the markdown results here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in METHOD_SETS]
    if unknown:
        parser.error(f"--models: {unknown} not in {', '.join(METHOD_SETS)}")
    body = run(models, args.steps, args.every, args.quick)
    write_section(args.out, "Kernels against their fallbacks in real models", environment_line(command_line()), body)


if __name__ == "__main__":
    main()
