"""Run state: what a replacement module needs to resume a run, kept out of its ``state_dict``.

A replacement must keep the original module's ``state_dict`` keys, so a checkpoint saved before
surgery loads after it and one saved after loads into the plain model, both with ``strict=True``.
Some replacements still carry state that a resumed run needs: SeededDropout's seed stream,
GyroDropout's selected masks and schedule position. They expose it as *run state*
(``run_state()`` / ``load_run_state(state)``), and :func:`save_run_state` /
:func:`load_run_state` gather it for a whole model, keyed by module name, to be saved next to
the ``state_dict``. The Trainer's checkpoints do this; a custom training loop does it by hand::

    torch.save({"model": model.state_dict(), "run_state": save_run_state(model)}, path)
    ...
    model.load_state_dict(saved["model"]); load_run_state(model, saved["run_state"])
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = ["HasRunState", "save_run_state", "load_run_state"]


@runtime_checkable
class HasRunState(Protocol):
    """A module with run state: plain containers of ints, floats, strings and tensors."""

    def run_state(self) -> dict[str, Any]: ...

    def load_run_state(self, state: dict[str, Any]) -> None: ...


def _stateful_modules(model: nn.Module) -> dict[str, HasRunState]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HasRunState)}


def save_run_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The run state of every module of ``model`` that has one, keyed by module name.

    Example:
        >>> from slipstream.nn import SeededDropout
        >>> model = nn.Sequential(nn.Linear(4, 4), SeededDropout(0.1, seed=3))
        >>> save_run_state(model)
        {'1': {'key': 3, 'calls': 0}}
        >>> sorted(model.state_dict())  # the same keys as with nn.Dropout
        ['0.bias', '0.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {name: module.run_state() for name, module in _stateful_modules(model).items()}


def load_run_state(model: nn.Module, state: dict[str, dict[str, Any]], strict: bool = True) -> None:
    """Load what :func:`save_run_state` returned into the modules of ``model`` with those names.

    ``strict``: module names must match both ways (ValueError otherwise); with ``strict=False``,
    modules without saved state keep theirs and saved entries without a module are ignored.

    Example:
        >>> from slipstream.nn import SeededDropout
        >>> model = nn.Sequential(nn.Linear(4, 4), SeededDropout(0.1, seed=3))
        >>> load_run_state(model, {'1': {'key': 8, 'calls': 2}})
        >>> save_run_state(model)['1']
        {'key': 8, 'calls': 2}
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be the dict save_run_state returned, got {type(state).__name__}")
    modules = _stateful_modules(model)
    if strict:
        missing, unexpected = sorted(set(modules) - set(state)), sorted(set(state) - set(modules))
        if missing or unexpected:
            raise ValueError(f"run state does not fit this model: missing modules {missing}, "
                             f"unexpected modules {unexpected} (strict=False loads what fits)")
    for name, module in modules.items():
        if name in state:
            module.load_run_state(state[name])
