"""Train a small MLP on scikit-learn's handwritten digits with the slipstream Trainer, plain and with
slipstream methods, and print each run's test accuracy, time and what the methods changed.

The data ships inside scikit-learn (1,797 8x8 images): nothing is downloaded. Runs on the CPU, or
on the GPU when there is one (in ``amp_bf16``, where the low-precision norms apply).

Run:
    python examples/train_digits.py
    torchrun --nproc_per_node 2 examples/train_digits.py      # DDP, one process per GPU (gloo on CPUs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from typing import Optional

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, TensorDataset

from slipstream.algorithms import Algorithm, FusedLayerNorm, GyroDropout, LowMemoryDropout, LowPrecisionLayerNorm
from slipstream.precision import autocast_dtype
from slipstream.trainer import InMemoryLogger, Trainer
from slipstream.trainer.amp import resolve_precision
from slipstream.trainer.distributed import resolve_device


def digits_split(seed: int, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (train, test) datasets, pixels scaled to [0, 1], split by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(order) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[test], targets[test])


def build_model(hidden: int, dropout: float = 0.1) -> nn.Sequential:
    """A 3-layer MLP with LayerNorm and Dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def method_sets(precision: str) -> dict[str, list[Algorithm]]:
    """The runs to compare: the norm method alone, then with each dropout method (both replace nn.Dropout).

    Low-precision norms only act under autocast; in fp32 the fused norm runs instead.
    """
    norm = LowPrecisionLayerNorm if autocast_dtype(precision) is not None else FusedLayerNorm
    return {
        "plain": [],
        norm.__name__: [norm()],
        f"{norm.__name__} + LowMemoryDropout": [norm(), LowMemoryDropout(seed=0)],
        f"{norm.__name__} + GyroDropout": [norm(), GyroDropout(sigma=64, tau=4)],
    }


def module_changes(before: Counter, model: nn.Module) -> str:
    """What surgery changed, as 'LayerNorm x2 -> LPLayerNorm x2'."""
    after = Counter(type(m).__name__ for m in model.modules())
    gone = [f"{name} x{count}" for name, count in (before - after).items()]
    new = [f"{name} x{count}" for name, count in (after - before).items()]
    return f"{', '.join(gone)} -> {', '.join(new)}" if new else "nothing"


def train_once(algorithms: list[Algorithm], args: argparse.Namespace, precision: str) -> dict:
    """One Trainer run from the same initial weights; returns accuracy, timings and changes."""
    train, test = digits_split(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.hidden)
    before = Counter(type(m).__name__ for m in model.modules())
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(train, batch_size=args.batch_size, shuffle=True),
        eval_dataloader=DataLoader(test, batch_size=256), max_duration=f"{args.epochs}ep",
        eval_interval=f"{args.epochs}ep", algorithms=algorithms, precision=precision, device=args.device,
        optimizers=torch.optim.AdamW(model.parameters(), lr=args.lr), seed=args.seed, loggers=[memory],
        progress_bar=False,
    )
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    # Loggers run on rank 0 only: other ranks see no records.
    per_epoch = [metrics["throughput/samples_per_s"] for _, metrics in memory.records
                 if "throughput/samples_per_s" in metrics] or [float("nan")]
    return {
        "accuracy": trainer.state.eval_metrics["accuracy"], "fit_s": seconds,
        "samples_per_s": statistics.median(per_epoch[1:] or per_epoch),  # the first epoch warms up
        "changed": module_changes(before, trainer.state.model), "rank": trainer.state.rank,
        "world_size": trainer.state.world_size, "device": str(trainer.state.device),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="'cpu', 'cuda' (default: the GPU when present)")
    parser.add_argument("--precision", default=None, help="'fp32', 'amp_fp16', 'amp_bf16' (default: per device)")
    parser.add_argument("--results", default=None, help="also write the results as JSON here (rank 0)")
    return parser.parse_args(argv)


def run(argv: Optional[list[str]] = None) -> dict:
    """Train every method set, print the comparison on rank 0 and return ``{methods: results}``."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # matrices this small run slower split over threads, and far slower on a busy machine
    precision = resolve_precision(args.precision, device)
    results = {name: train_once(algorithms, args, precision) for name, algorithms in method_sets(precision).items()}
    first = next(iter(results.values()))
    if first["rank"] != 0:
        return results
    print(f"digits, {args.epochs} epochs, batch {args.batch_size} x {first['world_size']} process(es), "
          f"hidden {args.hidden}, {first['device']}, {precision}")
    print(f"{'methods':<40} {'test acc':>8} {'fit s':>7} {'samples/s':>10}  changed")
    for name, result in results.items():
        print(f"{name:<40} {result['accuracy']:>8.4f} {result['fit_s']:>7.2f} {result['samples_per_s']:>10.0f}  "
              f"{result['changed']}")
    if args.results:
        with open(args.results, "w") as file:
            json.dump({"args": vars(args), "precision": precision, "runs": results}, file, indent=1)
    return results


@record  # under torchrun, a failing rank's traceback is reported as the job's error
def main() -> None:
    run()


if __name__ == "__main__":
    main()
