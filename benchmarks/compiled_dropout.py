"""What SeededDropout costs a torch.compile'd training step, and whether its seed's home is the cause.

Under ``torch.compile`` native dropout is fused by Inductor into the neighbouring pointwise kernels;
SeededDropout is a user Triton kernel (a ``triton_op``) that Inductor launches as its own kernel,
with its seed computed from the module's CPU stream state and copied to the GPU. This times one
compiled step (forward, backward; GPT-2 also fused AdamW) of the same model with each dropout:

* ``native``: ``nn.Dropout``; ``none``: no dropout (the floor);
* ``seeded``: slipstream's SeededDropout as shipped (CPU stream state);
* ``seeded_device_state``: the same with the stream's state tensor on the GPU, so the compiled graph
  computes the seeds there (no CPU kernel, no host-to-device copies);
* ``seeded_int``: the same kernel keyed by a constant Python int (no seed arithmetic, no copy): the
  least any separate dropout kernel can cost;
* ``seeded_fused``: SeededDropout with ``slipstream.config.compiled_dropout = "inductor"``: no kernel
  of ours, the mask as hashed PyTorch ops that Inductor fuses and recomputes in backward.

A ``_static`` suffix compiles that variant with ``torch._inductor.config.static_launch_user_defined_triton_kernels``
(Inductor's C++ launcher for user kernels instead of Triton's Python one, off by default in torch 2.11).
Variants are compiled first, then timed in interleaved rounds (the host's speed drifts); median per variant.

Models: ``mlp``, 12 residual MLP blocks on [8, 512, 768] bf16 with two dropouts each (24 calls, no
optimizer), and ``gpt2``, GPT-2 small on 8 x 512 tokens with fused AdamW (25 dropouts that run).

Run (repo root, one GPU): ``PYTHONPATH=. python benchmarks/compiled_dropout.py --model mlp --reps 5``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from benchmarks.common import slipstream_settings
from slipstream.nn import SeededDropout
from slipstream.nn.seed_stream import SeedStream, stream_seed_of_state
from slipstream.ops._triton_op import register_triton_op
from slipstream.ops.dropout import _scale, keep_threshold

VARIANTS = ("native", "none", "seeded", "seeded_device_state", "seeded_int", "seeded_fused")
P = 0.1


class DeviceStateStream(SeedStream):
    """A SeedStream whose state tensor lives on ``device`` (compiled use only)."""

    def __init__(self, key: int, device: torch.device) -> None:
        super().__init__(key)
        self.state = self.state.to(device)
        self._one_call = torch.tensor([0, 1], device=device)

    def next(self) -> torch.Tensor:
        seed = stream_seed_of_state(self.state)
        self.state = self.state + self._one_call
        return seed


def _int_seed_dropout_body(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    from slipstream.ops.kernels.dropout import launch_seeded_dropout

    out = torch.empty_like(x)
    launch_seeded_dropout(x, out, keep_threshold(p), _scale(p), seed, None, traceable=True, one_row=True)
    return out


def _int_seed_dropout_setup(ctx, inputs, output) -> None:
    _, ctx.p, ctx.seed = inputs


def _int_seed_dropout_backward(ctx, grad: torch.Tensor):
    return _int_seed_dropout(grad, ctx.p, ctx.seed), None, None


_int_seed_dropout = register_triton_op("slipstream_bench::int_seed_dropout", _int_seed_dropout_body)
_int_seed_dropout.register_autograd(_int_seed_dropout_backward, setup_context=_int_seed_dropout_setup)


class IntSeedDropout(nn.Module):
    """Seeded dropout keyed by a constant int: the same kernel with nothing to compute or copy per call."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int_seed_dropout(x, self.p, self.seed) if self.training else x


def dropout_for(variant: str, p: float, index: int, device: torch.device) -> nn.Module:
    """The dropout module of ``variant`` (without a ``_static`` suffix) for call site ``index``."""
    if variant == "native":
        return nn.Dropout(p)
    if variant == "none":
        return nn.Dropout(0.0)
    if variant == "seeded_int":
        return IntSeedDropout(p, 1000 + index)
    module = SeededDropout(p, seed=index)
    if variant == "seeded_device_state":
        module._seeds = DeviceStateStream(index, device)
    elif variant not in ("seeded", "seeded_fused"):
        raise ValueError(f"variant must be one of {VARIANTS} (optionally + '_static'), got {variant!r}")
    return module


class _Block(nn.Module):
    def __init__(self, variant: str, index: int, device: torch.device) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(768, 3072), nn.Linear(3072, 768)
        self.drop1 = dropout_for(variant, P, 2 * index, device)
        self.drop2 = dropout_for(variant, P, 2 * index + 1, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.fc2(self.drop1(torch.relu(self.fc1(x)))))


def mlp_step(variant: str, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block(variant, i, device) for i in range(12)]).to(device)
    compiled = torch.compile(model)
    x = torch.randn(8, 512, 768, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = compiled(x)
        y.float().square().mean().backward()

    return step


def gpt2_step(variant: str, device: torch.device) -> Callable[[], None]:
    from benchmarks.end_to_end_models import build_gpt2, gpt2_batches

    torch.manual_seed(0)
    with device:
        model = build_gpt2(False)
    model.train()
    sites = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Dropout)]
    for index, (parent, name) in enumerate(sites):
        setattr(parent, name, dropout_for(variant, getattr(parent, name).p, index, device))
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in gpt2_batches(False, torch.Generator().manual_seed(0), 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(lambda batch: model(**batch).loss)
    done = [0]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled(batches[done[0] % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done[0] += 1

    return step


def _with_dropout_path(variant: str, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run with the ``slipstream.config.compiled_dropout`` of ``variant`` (compiled code guards on it)."""
    path = "inductor" if variant.startswith("seeded_fused") else "kernel"

    def run() -> None:
        with slipstream_settings(compiled_dropout=path):
            step()

    return run


def _timed_ms(step: Callable[[], None], steps: int) -> float:
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "gpt2"), default="mlp")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import torch._inductor.config as inductor_config

    device = torch.device("cuda")
    build = mlp_step if args.model == "mlp" else gpt2_step
    steps = {}
    for variant in args.variants.split(","):
        inductor_config.static_launch_user_defined_triton_kernels = variant.endswith("_static")
        steps[variant] = _with_dropout_path(variant, build(variant.removesuffix("_static"), device))
        for _ in range(3):  # compiles here, with the launcher setting of this variant
            steps[variant]()
    inductor_config.static_launch_user_defined_triton_kernels = False
    times = {variant: [] for variant in steps}
    for _ in range(args.reps):
        for variant, step in steps.items():
            times[variant].append(_timed_ms(step, args.steps))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
               "step_ms": {v: {"median": statistics.median(t), "rounds": t} for v, t in times.items()}}
    print(f"{results['gpu']}, torch {results['torch']}, model {args.model}: step ms, median (rounds)")
    for variant, row in results["step_ms"].items():
        print(f"  {variant:28s} {row['median']:7.2f}  ({', '.join(f'{t:.2f}' for t in row['rounds'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
