"""The end-to-end loss-curve check: do the methods leave training where the seed noise leaves it?

One model (GPT-2 small by default) trains ``--curve-steps`` steps eager, without methods and with
all of them, at each of ``--curve-seeds`` seeds (a seed sets the initial weights and the dropout
draws; the batches are the same fresh ones in every run). Each curve is smoothed by a moving
median, and a curve's gap to another is the mean absolute difference of the smoothed curves. The
seed noise is the largest gap between two baseline seeds; the methods pass when each methods curve
is within that of the baseline curve of its own seed.

Why a median: GPT-2 on these batches has loss spikes (one to three steps at about 19 nats, back to
6.9 after) near step 66 in every run, eager included, longer or shorter and a step earlier or
later with each seed and dropout stream. A moving average turns a one-step spike into ten steps
about 1.2 nats high, so its gaps measure where the spikes fell rather than the curves: on the H100
(session 16) the methods' seed-0 gap read 0.188 against a seed gap of 0.122, all of it in steps
60-84. A median over 10 steps ignores spikes shorter than 5 steps; the spikes are counted and
listed on their own.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import write_section
from benchmarks.end_to_end_models import ModelSpec
from benchmarks.end_to_end_training import (
    Config, MethodFn, Trainee, _tensor_bytes, batch_pool, free_device_memory,
)

__all__ = ["moving_median", "mean_gap", "spikes", "judge", "run_loss_curve"]

SMOOTHING_WINDOW = 10
SPIKE_NATS = 1.0  # a step this far above the median of the steps before it is a spike
CURVE_POOL_BYTES = 2**30  # fresh batches for the curve (no early repeats to memorize), within this memory


def moving_median(values: list[float], window: int) -> list[float]:
    """Median of each ``window`` consecutive values (one per full window; the lower middle for even windows).

    Example:
        >>> moving_median([1.0, 9.0, 2.0, 3.0], 3)
        [2.0, 3.0]
    """
    t = torch.tensor(values, dtype=torch.float64)
    return t.unfold(0, window, 1).median(dim=1).values.tolist()


def mean_gap(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of two equally long curves.

    Example:
        >>> mean_gap([1.0, 2.0], [1.5, 1.0])
        0.75
    """
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().mean())


def spikes(curve: list[float], window: int, nats: float = SPIKE_NATS) -> list[int]:
    """Steps (1-based) whose loss is more than ``nats`` above the median of the ``window`` steps before.

    Example:
        >>> spikes([5.0, 4.0, 3.0, 3.0, 19.0, 3.0], window=3)
        [5]
    """
    before = moving_median(curve[:-1], window) if len(curve) > window else []  # before[j]: steps j .. j + window - 1
    return [j + window + 1 for j, median in enumerate(before) if curve[j + window] > median + nats]


def judge(baseline: dict[int, list[float]], methods: dict[int, list[float]], window: int) -> dict:
    """Seed noise (largest gap between two baseline seeds), each seed's methods gap, and whether all are within.

    ``baseline`` and ``methods`` map each seed to its curve; gaps are between moving medians.

    Example:
        >>> flat = [6.0] * 10
        >>> judge({0: flat, 1: [6.2] * 10}, {0: [6.1] * 10, 1: flat}, window=2)["passed"]
        True
    """
    smoothed = {(kind, seed): moving_median(curve, window)
                for kind, curves in (("baseline", baseline), ("methods", methods)) for seed, curve in curves.items()}
    seed_gap = max(mean_gap(smoothed["baseline", a], smoothed["baseline", b])
                   for a, b in itertools.combinations(sorted(baseline), 2))
    method_gaps = {seed: mean_gap(smoothed["methods", seed], smoothed["baseline", seed]) for seed in methods}
    return {"seed_gap": seed_gap, "method_gaps": method_gaps, "passed": max(method_gaps.values()) <= seed_gap}


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
    """One PNG with every curve (raw, faint; moving median, solid). False when matplotlib is missing."""
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
        ax.plot(range(window, len(curve) + 1), moving_median(curve, window), color=color, label=label,
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
    """Train the curves, judge the methods against the seed noise, plot, and report."""
    batch_bytes = _tensor_bytes(batch_pool(spec, args.quick, device, count=1)[0].values())
    count = max(1, min(args.curve_steps, CURVE_POOL_BYTES // batch_bytes))
    batches = batch_pool(spec, args.quick, device, count=count)
    seeds = list(range(args.seed, args.seed + args.curve_seeds))
    window = max(1, min(SMOOTHING_WINDOW, args.curve_steps // 4))
    configs = {"baseline": Config("eager", (), False), "all methods": Config("all", tuple(methods), False)}
    curves: dict[str, dict[int, list[float]]] = {label: {} for label in configs}
    surgery: dict = {}
    for seed in seeds:  # seed by seed, so a run cut short still holds complete pairs
        for label, config in configs.items():
            curves[label][seed], surgery = _train_curve(spec, config, methods, batches, device, args, seed)
            print(f"[loss curve] {label}, seed {seed}: final loss {curves[label][seed][-1]:.4f}", flush=True)
    verdict = judge(curves["baseline"], curves["all methods"], window)
    named = {f"{label}, seed {seed}": curve for label, by_seed in curves.items() for seed, curve in by_seed.items()}
    title = f"{spec.name}: {args.curve_steps} steps, bf16 autocast, with and without slipstream methods"
    plotted = _plot(named, window, title, args.png)
    spike_steps = {name: spikes(curve, window) for name, curve in named.items()}
    lines = [
        f"{spec.name}, {args.curve_steps} steps, batch {spec.describe(batches[0])}, {len(batches)} distinct batches; "
        "methods applied: " + ("; ".join(f"`{m}` {s}" for m, s in surgery.items()) or "none"),
        "",
        f"- seed noise: largest gap between two baseline seeds (mean |difference| of {window}-step moving "
        f"medians): {verdict['seed_gap']:.4f}",
        *[f"- methods vs baseline, seed {s}: {gap:.4f}" for s, gap in verdict["method_gaps"].items()],
        "- final losses: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in named.items()),
        f"- loss spikes (steps > {SPIKE_NATS} nats above the median of the {window} before): "
        + "; ".join(f"{k}: {v or 'none'}" for k, v in spike_steps.items()),
        f"- result: {'within' if verdict['passed'] else 'OUTSIDE'} the seed-to-seed noise",
        f"- plot: {args.png if plotted else 'not drawn (matplotlib is not installed)'}",
    ]
    write_section(args.out, "End-to-end loss curve", env, "\n".join(lines))
    return {
        "model": spec.name, "steps": args.curve_steps, "window": window, "surgery": surgery, "curves": named,
        "seed_gap": verdict["seed_gap"], "method_gaps": verdict["method_gaps"], "passed": verdict["passed"],
        "spikes": spike_steps, "plot": args.png if plotted else None, "environment": env,
    }
