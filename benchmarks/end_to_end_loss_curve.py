"""The end-to-end loss-curve check: do the methods leave training where the seed noise leaves it?

One model (GPT-2 small by default) trains ``--curve-steps`` steps four times, eager: without methods
and with all of them, each at two seeds (seeds change the initial weights and dropout draws; the
batches, up to 200 distinct ones, stay the same). The curves are smoothed with a moving average; the methods pass when the gap
between a methods curve and the baseline of the same seed stays within the gap between the two
baseline seeds (mean absolute difference of the smoothed curves).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import write_section
from benchmarks.end_to_end_models import ModelSpec
from benchmarks.end_to_end_training import Config, MethodFn, Trainee, batch_pool, free_device_memory

__all__ = ["smooth", "mean_gap", "run_loss_curve"]

SMOOTHING_WINDOW = 10
MAX_CURVE_BATCHES = 200  # fresh batches for the curve (no early repeats to memorize), within memory


def smooth(values: list[float], window: int) -> list[float]:
    """Moving average over ``window`` steps (one value per full window).

    Example:
        >>> smooth([1.0, 2.0, 3.0, 4.0], 2)
        [1.5, 2.5, 3.5]
    """
    t = torch.tensor(values, dtype=torch.float64)
    return t.unfold(0, window, 1).mean(dim=1).tolist()


def mean_gap(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of two equally long curves.

    Example:
        >>> mean_gap([1.0, 2.0], [1.5, 1.0])
        0.75
    """
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().mean())


def _train_curve(spec: ModelSpec, config: Config, methods: dict[str, MethodFn], batches: list,
                 device: torch.device, args: argparse.Namespace, seed: int) -> tuple[list[float], dict]:
    trainee = Trainee(spec, config, methods, batches, device, args.quick, seed)
    for _ in range(args.curve_steps):
        trainee.step()
    curve = [float(loss) for loss in trainee.losses]
    surgery = {m: r.summary() for m, r in trainee.surgery.items()}
    del trainee
    free_device_memory()
    return curve, surgery


def _plot(curves: dict[str, list[float]], window: int, title: str, path: str) -> bool:
    """One PNG with every curve (raw, faint; smoothed, solid). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(range(window, len(curve) + 1), smooth(curve, window), color=color, label=label,
                linestyle="--" if "baseline" in label else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_loss_curve(spec: ModelSpec, args: argparse.Namespace, methods: dict[str, MethodFn],
                   device: torch.device, env: str) -> dict:
    """Train the four curves, judge the methods against the seed noise, plot, and report."""
    batches = batch_pool(spec, args.quick, device, count=min(args.curve_steps, MAX_CURVE_BATCHES))
    seeds = (args.seed, args.seed + 1)
    window = max(1, min(SMOOTHING_WINDOW, args.curve_steps // 4))
    curves, smoothed, surgery = {}, {}, {}
    for label, config in (("baseline", Config("eager", (), False)), ("all methods", Config("all", tuple(methods), False))):
        for seed in seeds:
            key = f"{label}, seed {seed}"
            curves[key], surgery = _train_curve(spec, config, methods, batches, device, args, seed)
            smoothed[key] = smooth(curves[key], window)
            print(f"[loss curve] {key}: final loss {curves[key][-1]:.4f}", flush=True)
    seed_gap = mean_gap(smoothed[f"baseline, seed {seeds[0]}"], smoothed[f"baseline, seed {seeds[1]}"])
    method_gaps = {s: mean_gap(smoothed[f"all methods, seed {s}"], smoothed[f"baseline, seed {s}"]) for s in seeds}
    passed = max(method_gaps.values()) <= seed_gap
    title = f"{spec.name}: {args.curve_steps} steps, bf16 autocast, with and without slipstream methods"
    plotted = _plot(curves, window, title, args.png)
    lines = [
        f"{spec.name}, {args.curve_steps} steps, batch {spec.describe(batches[0])}; methods applied: "
        + ("; ".join(f"`{m}` {s}" for m, s in surgery.items()) or "none"),
        "",
        f"- seed-to-seed gap of the baseline (mean |difference| of {window}-step moving averages): {seed_gap:.4f}",
        *[f"- methods vs baseline, seed {s}: {gap:.4f}" for s, gap in method_gaps.items()],
        f"- final losses: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in curves.items()),
        f"- result: {'within' if passed else 'OUTSIDE'} the seed-to-seed noise",
        f"- plot: {args.png if plotted else 'not drawn (matplotlib is not installed)'}",
    ]
    write_section(args.out, "End-to-end loss curve", env, "\n".join(lines))
    return {
        "model": spec.name, "steps": args.curve_steps, "window": window, "surgery": surgery, "curves": curves,
        "seed_gap": seed_gap, "method_gaps": method_gaps, "passed": passed, "plot": args.png if plotted else None,
        "environment": env,
    }
