"""Accuracy study: the same MLP trained with no dropout, ``nn.Dropout`` and Gyro Dropout, several seeds each.

Data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package; nothing is
downloaded). Each seed draws its own stratified half/half train/test split, initial weights and
batch order, shared by every method, so the methods are compared pair by pair. Test accuracy is
read once, after the last epoch (no early stopping, no picking the best epoch). Gyro Dropout is
applied with :func:`slipstream.functional.apply_gyro_dropout`, keeping the Dropout's ``p``.

Run (CPU, a few minutes on 2 cores):
``python benchmarks/gyro_accuracy.py --out docs/gyro_dropout_results.md --plot docs/img/gyro_dropout.png``
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import slipstream.functional as sf
from benchmarks.common import Table, command_line


@dataclass(frozen=True)
class Method:
    """One training configuration: ``dropout`` is the Dropout p; ``gyro`` is (sigma, tau) or None."""

    label: str
    dropout: float
    gyro: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Setup:
    hidden: int = 512
    p: float = 0.5
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3


def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stratified 50/50 split of scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, test_size=0.5, stratify=labels, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def mlp(hidden: int, p: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(p),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p),
        nn.Linear(hidden, 10),
    )


def train_and_test(method: Method, setup: Setup, seed: int) -> float:
    """Test accuracy (%) after training ``method`` on the split, init and batch order of ``seed``."""
    x_train, y_train, x_test, y_test = digits_split(seed)
    torch.manual_seed(seed)
    model = mlp(setup.hidden, method.dropout)
    iters_per_epoch = -(-len(x_train) // setup.batch_size)
    if method.gyro is not None:
        sigma, tau = method.gyro
        sf.apply_gyro_dropout(model, sigma=sigma, tau=tau, iters_per_epoch=iters_per_epoch,
                              max_epoch=setup.epochs, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(setup.epochs):
        for batch in torch.randperm(len(x_train), generator=order).split(setup.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x_test).argmax(1) == y_test).float().mean())


def run_seed(seed: int, methods: list[Method], setup: Setup) -> list[float]:
    """Every method's test accuracy on ``seed`` (one worker process each seed)."""
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead; workers run side by side
    return [train_and_test(method, setup, seed) for method in methods]


def summarize(label: str, accuracies: list[float], baseline: Optional[list[float]], table: Table) -> None:
    """Add ``label``'s mean and std, and its paired difference to ``baseline`` (wins/ties/losses)."""
    mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
    if baseline is None:
        table.add(label, f"{mean:.2f}", f"{std:.2f}", "", "")
        return
    diffs = [a - b for a, b in zip(accuracies, baseline)]
    record = f"{sum(d > 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/{sum(d < 0 for d in diffs)}"
    table.add(label, f"{mean:.2f}", f"{std:.2f}", f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}",
              record)


def plot(results: dict[Method, list[float]], path: str, title: str) -> None:
    """Each seed's test accuracy per method (dots), with mean ± std (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.label for m in results]
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 4.2))
    for i, accuracies in enumerate(results.values()):
        ax.scatter([i] * len(accuracies), accuracies, s=14, alpha=0.6, color="tab:gray", zorder=3)
        ax.errorbar(i, statistics.mean(accuracies), yerr=statistics.stdev(accuracies), fmt="o", color="tab:red",
                    capsize=6, markersize=7, zorder=4)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=Setup.epochs)
    parser.add_argument("--out", default=None, help="also write the markdown results here")
    parser.add_argument("--plot", default=None, help="write the PNG plot here (needs matplotlib)")
    parser.add_argument("--workers", type=int, default=2, help="seeds trained in parallel processes")
    args = parser.parse_args()

    setup = Setup(epochs=args.epochs)
    no_dropout = Method("no dropout", 0.0)
    dropout = Method(f"nn.Dropout p={setup.p}", setup.p)
    sweep = [Method(f"Gyro σ={s} τ={t}", setup.p, (s, t)) for s, t in [(256, 16), (64, 16), (64, 4), (16, 4), (1024, 16)]]
    methods = [no_dropout, dropout, *sweep]

    started = time.perf_counter()
    results: dict[Method, list[float]] = {m: [] for m in methods}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        seeds = range(args.seeds)
        for seed, accuracies in zip(seeds, pool.map(run_seed, seeds, [methods] * args.seeds, [setup] * args.seeds)):
            for method, accuracy in zip(methods, accuracies):
                results[method].append(accuracy)
            print(f"seed {seed}: " + ", ".join(f"{m.label} {a:.2f}" for m, a in zip(methods, accuracies)), flush=True)
    minutes = (time.perf_counter() - started) / 60

    table = Table(["method", "mean test acc. (%)", "std", "paired diff. vs nn.Dropout", "wins/ties/losses"])
    for method in methods:
        summarize(method.label, results[method], None if method is dropout else results[dropout], table)
    iters_per_epoch = -(-len(digits_split(0)[0]) // setup.batch_size)
    schedule = ", ".join(
        f"σ={s} τ={t}: iter_num {max(1, iters_per_epoch * setup.epochs // s * t)}" for s, t in (m.gyro for m in sweep))
    text = (
        f"Setup: MLP 64-{setup.hidden}-{setup.hidden}-10 (ReLU, dropout p={setup.p} after each hidden layer), "
        f"Adam lr {setup.lr}, batch {setup.batch_size}, {setup.epochs} epochs ({iters_per_epoch} steps each), "
        f"{args.seeds} seeds; digits split 50/50 per seed (898 train / 899 test). Schedules: {schedule}.\n\n"
        f"{table.markdown()}\n\nPaired diff.: mean ± std over seeds of (method - nn.Dropout) on the same split, "
        f"init and batch order. Wall time {minutes:.1f} min on CPU (torch {torch.__version__}); "
        f"command: `{command_line()}`\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        plot(results, args.plot, f"digits, MLP {setup.hidden}x2, {args.seeds} seeds, test accuracy after {setup.epochs} epochs")


if __name__ == "__main__":
    main()
