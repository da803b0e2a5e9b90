"""Apply slipstream's Low Precision LayerNorm and GroupNorm to a small model and show what changed.

Run: ``python examples/low_precision_demo.py`` (CPU; uses CUDA when present).
"""

from __future__ import annotations

import torch
from torch import nn

import slipstream.functional as sf


def build_model() -> nn.Module:
    """A small conv net with GroupNorm feeding a transformer-style head with LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 10),
    )


def norm_compute_dtypes(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each norm's output comes out in, under autocast to ``dtype``."""
    seen: dict[str, torch.dtype] = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.dtype))
        for name, m in model.named_modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
    ]
    with torch.autocast(x.device.type, dtype=dtype):
        model(x).float().sum().backward()
    for h in handles:
        h.remove()
    return seen


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model().to(device)
    x = torch.randn(8, 3, 16, 16, device=device)
    before = norm_compute_dtypes(model, x, torch.bfloat16)

    replaced = {**sf.apply_low_precision_groupnorm(model, precision="amp_bf16"),
                **sf.apply_low_precision_layernorm(model, precision="amp_bf16")}
    after = norm_compute_dtypes(model, x, torch.bfloat16)

    print(f"device: {device}; modules replaced: {len(replaced)}")
    for old, new in replaced.items():
        print(f"  {type(old).__name__} -> {type(new).__name__}")
    for name in before:
        print(f"  norm {name}: computes in {before[name]} before, {after[name]} after (bf16 autocast)")


if __name__ == "__main__":
    main()
