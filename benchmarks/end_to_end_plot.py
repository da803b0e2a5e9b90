"""A PNG of end-to-end speed-ups, with their spread, from ``end_to_end.py --json`` result files.

Per model, one bar per comparison the issue names: methods against eager (``all`` vs ``eager``),
``compile`` against eager, and methods composed with a compile mode against that mode alone
(``all+compile`` vs ``compile``, ``all+compile, CUDA graphs`` vs ``compile, CUDA graphs``). Each bar is
the ratio of median step times, its whisker the range ``min(ref)/max(x) .. max(ref)/min(x)`` of the
round medians (as in the markdown report); the ``all`` vs ``eager`` bar carries the issue's target.
Several files may be given (e.g. one per model group). Each ratio comes from one file (one process),
and a comparison found in two files is plotted from the later one.

Run: ``python benchmarks/end_to_end_plot.py --json a.json b.json --png docs/img/end_to_end.png``
"""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple, Optional, Sequence

from benchmarks.end_to_end_report import TARGET_ALL_VS_EAGER, speedup

__all__ = ["Comparison", "COMPARISONS", "comparisons", "plot"]

#: (configuration, reference it is compared with), in plotting order.
COMPARISONS = (
    ("all", "eager"),
    ("compile", "eager"),
    ("all+compile", "compile"),
    ("all+compile, CUDA graphs", "compile, CUDA graphs"),
)


class Comparison(NamedTuple):
    """One bar: ``config``'s speed-up over ``reference`` for ``model``, with its spread and target."""

    model: str
    config: str
    reference: str
    ratio: float
    low: float
    high: float
    target: Optional[float]


def comparisons(results: Sequence[dict]) -> list[Comparison]:
    """Every comparison in :data:`COMPARISONS` whose two configurations a result holds.

    ``results``: the ``models`` lists of ``end_to_end.py --json`` files, one model's result each. Both
    configurations of a comparison come from one result; a later result's comparison replaces the same
    comparison of an earlier one (other comparisons of that model stay).

    Example:
        >>> eager = {"name": "eager", "median_ms": 10, "min_ms": 10, "max_ms": 10}
        >>> fast = {"name": "all", "median_ms": 8, "min_ms": 8, "max_ms": 8}
        >>> comparisons([{"model": "bert", "configs": [eager, fast]}])[0][:4]
        ('bert', 'all', 'eager', 1.25)
    """
    bars: dict[tuple[str, str, str], Comparison] = {}
    for result in results:
        model, configs = result["model"], {c["name"]: c for c in result["configs"]}
        for config, reference in COMPARISONS:
            if config in configs and reference in configs:
                ratio, low, high = speedup(configs[reference], configs[config])
                target = TARGET_ALL_VS_EAGER.get(model) if (config, reference) == ("all", "eager") else None
                bars[model, config, reference] = Comparison(model, config, reference, ratio, low, high, target)
    return list(bars.values())


def plot(bars: Sequence[Comparison], title: str, path: str) -> None:
    """Draw ``bars`` grouped by model (horizontal, speed-up axis; 1.0 = as fast as the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [pair for pair in COMPARISONS if any((b.config, b.reference) == pair for b in bars)]
    models = list(dict.fromkeys(b.model for b in bars))
    height = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(models)))
    for k, (config, reference) in enumerate(kinds):
        label: Optional[str] = f"{config} vs {reference}"  # on the first bar of this kind only
        for m, model in enumerate(models):
            bar = next((b for b in bars if (b.model, b.config, b.reference) == (model, config, reference)), None)
            if bar is None:
                continue
            y = m + (k - (len(kinds) - 1) / 2) * height
            ax.barh(y, bar.ratio, height, color=f"C{k}", label=label,
                    xerr=[[bar.ratio - bar.low], [bar.high - bar.ratio]], capsize=2)
            label = None
            if bar.target is not None:
                ax.plot([bar.target] * 2, [y - height / 2, y + height / 2], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (median step time of the reference / of the configuration); black tick: target")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", nargs="+", required=True, help="end_to_end.py --json files, in order")
    parser.add_argument("--png", required=True)
    parser.add_argument("--title", default="slipstream end to end: speed-up per training step")
    args = parser.parse_args(argv)
    results = []
    for name in args.json:
        with open(name) as f:
            results.extend(json.load(f)["models"])
    bars = comparisons(results)
    if not bars:
        raise SystemExit("no comparison found: the files hold no pair of configurations in COMPARISONS")
    plot(bars, args.title, args.png)
    for bar in bars:
        print(f"{bar.model}: {bar.config} vs {bar.reference} {bar.ratio:.2f}x ({bar.low:.2f}-{bar.high:.2f})")


if __name__ == "__main__":
    main()
