"""Training durations and intervals: ``'3ep'`` (epochs), ``'500ba'`` (batches), ``'2048sp'`` (samples)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Union

__all__ = ["TimeUnit", "Time", "Timestamp"]


class TimeUnit(str, Enum):
    """Units a duration can be given in."""

    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"


_ALLOWED = ", ".join(f"'{u.value}'" for u in TimeUnit)
_PATTERN = re.compile(r"^\s*(\d+)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Time:
    """A positive whole amount of one :class:`TimeUnit`.

    Example:
        >>> Time.parse('2ep')
        Time(value=2, unit=<TimeUnit.EPOCH: 'ep'>)
    """

    value: int
    unit: TimeUnit

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value <= 0:
            raise ValueError(f"a duration must be a positive whole number of {_ALLOWED}, got {self.value!r}")
        object.__setattr__(self, "unit", TimeUnit(self.unit))

    @classmethod
    def parse(cls, text: Union[str, "Time"], argument: str = "duration") -> "Time":
        """Parse ``'<positive int><unit>'`` with unit one of 'ep', 'ba', 'sp'; a ValueError names them."""
        if isinstance(text, Time):
            return text
        if not isinstance(text, str):
            raise TypeError(f"{argument} must be a string like '1ep', '500ba' or '2048sp', got {type(text).__name__}")
        match = _PATTERN.match(text)
        units = {u.value for u in TimeUnit}
        if match is None or match.group(2) not in units:
            raise ValueError(f"{argument}={text!r} is not '<positive int><unit>' with unit one of {_ALLOWED}")
        value = int(match.group(1))
        if value <= 0:
            raise ValueError(f"{argument}={text!r} must be positive (units: {_ALLOWED})")
        return cls(value, TimeUnit(match.group(2)))

    def __str__(self) -> str:
        return f"{self.value}{self.unit.value}"

    def reached(self, timestamp: "Timestamp") -> bool:
        """Whether ``timestamp`` has come this far (a duration is used up).

        Example:
            >>> Time.parse('3ba').reached(Timestamp(batch=3))
            True
        """
        return timestamp.get(self.unit) >= self.value

    def crossed(self, before: "Timestamp", after: "Timestamp") -> bool:
        """Whether a multiple of this interval lies in ``(before, after]`` (an interval fires).

        Counting multiples rather than testing ``after % value == 0`` lets sample intervals fire
        when a batch steps over the boundary.

        Example:
            >>> Time.parse('100sp').crossed(Timestamp(sample=96), Timestamp(sample=128))
            True
        """
        return after.get(self.unit) // self.value > before.get(self.unit) // self.value


@dataclass
class Timestamp:
    """Where training is: completed epochs, batches and samples (batches/samples count from fit start)."""

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    batch_in_epoch: int = 0

    def get(self, unit: TimeUnit) -> int:
        """The count in ``unit``."""
        return {TimeUnit.EPOCH: self.epoch, TimeUnit.BATCH: self.batch, TimeUnit.SAMPLE: self.sample}[TimeUnit(unit)]

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, batch=self.batch, sample=self.sample, batch_in_epoch=self.batch_in_epoch)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))
