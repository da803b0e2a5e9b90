"""Markdown for the end-to-end benchmark: surgery report, results table, and the issue's targets.

Speed-ups carry their noise: with per-round medians ``a`` and ``b``, ``b/a`` is reported with the
range ``min(b)/max(a) .. max(b)/min(a)``; a range that contains 1 is "noise", no result. A target is
met or missed only when the whole range is on one side of it.
"""

from __future__ import annotations

from typing import Optional

from benchmarks.common import Table
from benchmarks.end_to_end_training import FINAL_LOSS_STEPS

__all__ = ["TARGET_ALL_VS_EAGER", "speedup", "model_section"]

#: The issue's targets for all applicable methods together vs eager.
TARGET_ALL_VS_EAGER = {"gpt2": 1.05, "bert": 1.08, "convnext_tiny": 1.15, "resnet50_gn": 1.6, "unet": 1.3}
MIB = 2**20


def speedup(reference: dict, other: dict) -> tuple[float, float, float]:
    """``other``'s speed-up over ``reference`` (median ratio, low, high) from per-round medians.

    Example:
        >>> speedup({"median_ms": 10, "min_ms": 9, "max_ms": 11}, {"median_ms": 5, "min_ms": 5, "max_ms": 5})
        (2.0, 1.8, 2.2)
    """
    return (
        reference["median_ms"] / other["median_ms"],
        reference["min_ms"] / other["max_ms"],
        reference["max_ms"] / other["min_ms"],
    )


def _verdict(low: float, high: float) -> str:
    if low > 1:
        return "faster"
    if high < 1:
        return "slower"
    return "noise"


def _speedup_cell(reference: Optional[dict], other: dict) -> str:
    if reference is None or reference is other:
        return ""
    ratio, low, high = speedup(reference, other)
    return f"{ratio:.2f}x ({low:.2f}-{high:.2f}) {_verdict(low, high)}"


def _mib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MIB:.0f}"


def _by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["configs"]}


def _surgery_lines(result: dict) -> list[str]:
    lines = ["Surgery report (each method alone on a fresh model; modules replaced):", ""]
    for method, record in result["surgery"].items():
        lines.append(f"- `{method}`: {record}")
    if not result["surgery"]:
        lines.append("- no slipstream method found in `slipstream.functional`")
    for config in result["configs"]:
        if len(config["methods"]) > 1:
            applied = "; ".join(f"`{m}` {s}" for m, s in config["surgery"].items())
            lines.append(f"- `{config['name']}` applies, in order: {applied}")
        if config["compiled"]:
            lines.append(f"- `{config['name']}`: {config['graph_breaks']} graph breaks, "
                         f"{config['graphs']} graphs compiled")
    if result["dropout_mask_bytes"]:
        lines.append(f"- eager dropout masks (nn.Dropout, p > 0): {result['dropout_mask_bytes'] / MIB:.3g} MiB a step")
    return lines


def _results_table(result: dict) -> str:
    configs = _by_name(result)
    eager, compiled = configs.get("eager"), configs.get("compile")
    loss_steps = f"{max(1, result['loss_steps'] - FINAL_LOSS_STEPS + 1)}-{result['loss_steps']}"
    table = Table([
        "config", "step ms (median)", "spread ms", result["unit"], "peak MiB", f"median loss, steps {loss_steps}",
        "vs eager", "vs compile",
    ])
    for c in result["configs"]:
        table.add(
            c["name"], f"{c['median_ms']:.2f}", f"{c['min_ms']:.2f}-{c['max_ms']:.2f}", f"{c['throughput']:.0f}",
            _mib(c["peak_bytes"]), f"{c['final_loss']:.4f}", _speedup_cell(eager, c),
            _speedup_cell(compiled, c) if c["compiled"] else "",
        )
    return table.markdown()


def target_status(low: float, high: float, target: float) -> str:
    """Whether a speed-up's spread ``low..high`` meets ``target``: a spread that straddles it is no result.

    Example:
        >>> target_status(0.84, 1.17, 1.0)
        'inside the spread: no result'
    """
    if low >= target:
        return "met"
    if high < target:
        return "missed"
    return "inside the spread: no result"


def _target_lines(result: dict) -> list[str]:
    configs = _by_name(result)
    lines = []

    def ratio_line(label: str, reference: str, other: str, target: float) -> None:
        if reference in configs and other in configs:
            ratio, low, high = speedup(configs[reference], configs[other])
            status = target_status(low, high, target)
            lines.append(f"- {label}: {ratio:.2f}x ({low:.2f}-{high:.2f}), target >= {target:.2f}x: {status}")

    ratio_line("all methods vs eager", "eager", "all", TARGET_ALL_VS_EAGER.get(result["model"], 1.0))
    ratio_line("all methods + torch.compile vs torch.compile", "compile", "all+compile", 1.0)
    ratio_line("all methods + torch.compile, kernel dropout, vs torch.compile", "compile",
               "all+compile, kernel dropout", 1.0)
    ratio_line("all methods + torch.compile vs torch.compile, both with CUDA graphs", "compile, CUDA graphs",
               "all+compile, CUDA graphs", 1.0)
    low_memory = configs.get("low_memory_dropout") or (
        configs.get("all") if "low_memory_dropout" in result["applicable"] else None
    )
    eager = configs.get("eager")
    if low_memory and eager and eager["peak_bytes"] is not None and result["dropout_mask_bytes"]:
        saved = eager["peak_bytes"] - low_memory["peak_bytes"]
        status = "met" if saved >= result["dropout_mask_bytes"] else "missed"
        lines.append(
            f"- peak memory saved by `{low_memory['name']}`: {saved / MIB:.3g} MiB, target >= dropout masks "
            f"{result['dropout_mask_bytes'] / MIB:.3g} MiB: {status}"
        )
    return ["Targets:", "", *lines] if lines else []


def model_section(result: dict) -> str:
    """The markdown section of one model: header, surgery report, results table, targets."""
    if result.get("skipped"):
        return f"### {result['model']}\n\nskipped: {result['skipped']}\n"
    header = (
        f"### {result['model']}\n\nbatch {result['batch']}; {result['steps']} timed steps x {result['rounds']} "
        f"rounds (configurations interleaved); step time = median over rounds of each round's median, spread = "
        f"min-max of the round medians; loss = median of the last {FINAL_LOSS_STEPS} of {result['loss_steps']} "
        "steps, same seed and batches."
    )
    failures = "\n".join(f"- `{name}` failed: {error}" for name, error in result["failed"].items())
    parts = [header, "\n".join(_surgery_lines(result)), _results_table(result), failures,
             "\n".join(_target_lines(result))]
    return "\n\n".join(p for p in parts if p) + "\n"
