"""Shared benchmark plumbing: copy bandwidth, median timing, effective GB/s, markdown rows.

Every kernel benchmark checks correctness first, then times with ``triton.testing.do_bench``
(median) and reports effective bandwidth = fewest bytes the op must move / median time, beside the
device-to-device copy bandwidth measured in the same process (bytes read + bytes written).
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from slipstream import config


def do_bench_median(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in milliseconds (``triton.testing.do_bench``, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


@contextlib.contextmanager
def slipstream_settings(**settings: Optional[str]) -> Iterator[None]:
    """Run the block with the given ``slipstream.config`` settings, restored afterwards.

    A setting given as None is left as it is. A setting this slipstream does not have (an older
    checkout) is added for the block and removed after.
    """
    settings = {name: value for name, value in settings.items() if value is not None}
    missing = object()
    before = {name: getattr(config, name, missing) for name in settings}
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is missing:
                delattr(config, name)
            else:
                setattr(config, name, value)


def eager_launch(mode: str) -> contextlib.AbstractContextManager:
    """Run the block with ``slipstream.config.eager_launch = mode`` (``"cached"`` or ``"triton"``)."""
    return slipstream_settings(eager_launch=mode)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench_median(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


def gbs(nbytes: float, ms: float) -> float:
    """Bytes over milliseconds as GB/s."""
    return nbytes / ms / 1e6


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere makes it infinite."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def environment_line(command: str) -> str:
    """One line naming GPU, versions, date and the exact command, for docs/benchmarks.md."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}; "
        f"Python {platform.python_version()}; date {datetime.date.today().isoformat()}; "
        f"command: `{command}`"
    )


def command_line() -> str:
    """The command that started this process, as typed."""
    return "python " + " ".join(sys.argv)


@dataclass
class Table:
    """A markdown table built row by row and printed or written at the end."""

    columns: Sequence[str]
    rows: list = field(default_factory=list)

    def add(self, *values: object) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} values, got {len(values)}")
        self.rows.append([_fmt(v) for v in values])

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join([head, sep, *body])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_section(path: Optional[str], title: str, env: str, body: str) -> None:
    """Print a results section and, if ``path`` is given, write it there too (markdown)."""
    text = f"## {title}\n\n{env}\n\n{body}\n"
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
