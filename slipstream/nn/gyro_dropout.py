"""Gyro Dropout: dropout that trains a fixed set of pre-selected subnetworks (Lee et al., MLSys 2022).

Plain dropout draws a fresh mask per sample per step, so each subnetwork it trains is seen about
once. Gyro Dropout draws ``sigma`` masks over the feature (last) dimension once and trains only
those: at each step ``tau`` of them are active, the batch is split into ``tau`` groups and group
``i`` uses active mask ``i``. The active set changes every ``iter_num`` steps, walking the masks in
permutation order so that over the planned run every mask trains for about the same number of
samples: ``iter_num = floor(total_steps / sigma) * tau`` (at least 1), with
``total_steps = iters_per_epoch * max_epoch``.

State. Every random draw (the masks, then the schedule of active sets) happens once, on the first
training forward (the feature width is unknown before), from a generator seeded with ``seed``.
The masks, the schedule, the step counter and the seed are run state
(:mod:`slipstream.nn.run_state`), kept out of ``state_dict`` so that its keys stay those of
``nn.Dropout`` (none): a run resumed with its run state uses exactly the masks an uninterrupted
run would have used. A run longer than planned
repeats the schedule from its start. Masks and schedule stay on the CPU; only the active set's
``(tau, features)`` scales live on the input's device.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from slipstream.nn._capture import refuse_eager_cuda_graph_capture

__all__ = ["GyroDropout", "check_gyro_arguments", "check_run_length"]

def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_gyro_arguments(p: Optional[float], sigma: int, tau: int, p_may_be_none: bool = False) -> None:
    """Raise ValueError/TypeError unless ``0 <= p < 1``, ``sigma >= 1`` and ``1 <= tau <= sigma``.

    Example:
        >>> check_gyro_arguments(0.5, sigma=256, tau=16)
        >>> check_gyro_arguments(0.5, sigma=8, tau=16)
        Traceback (most recent call last):
        ...
        ValueError: tau must be <= sigma (tau active masks are drawn from sigma), got tau=16, sigma=8
    """
    _check_positive_int(sigma, "sigma")
    _check_positive_int(tau, "tau")
    if tau > sigma:
        raise ValueError(f"tau must be <= sigma (tau active masks are drawn from sigma), got tau={tau}, sigma={sigma}")
    if p is None and p_may_be_none:
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1), got {type(p).__name__}")
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")


def check_run_length(iters_per_epoch: int, max_epoch: Union[int, float]) -> None:
    """Raise ValueError/TypeError unless ``iters_per_epoch`` is an int >= 1 and ``max_epoch`` a finite number > 0.

    Example:
        >>> check_run_length(196, 100)
        >>> check_run_length(196, 0)
        Traceback (most recent call last):
        ...
        ValueError: max_epoch must be a finite number > 0, got 0
    """
    _check_positive_int(iters_per_epoch, "iters_per_epoch")
    if isinstance(max_epoch, bool) or not isinstance(max_epoch, (int, float)):
        raise TypeError(f"max_epoch must be a positive number, got {type(max_epoch).__name__}")
    if not 0 < max_epoch < math.inf:
        raise ValueError(f"max_epoch must be a finite number > 0, got {max_epoch}")


def _permutation_walk(sigma: int, tau: int, n_sets: int, generator: torch.Generator) -> torch.Tensor:
    """``n_sets`` rows of ``tau`` distinct mask indices, taken in order from successive permutations.

    Each permutation of ``range(sigma)`` is used up before the next starts, so every mask is active
    once per cycle. A set that straddles two cycles takes the old cycle's leftovers and the first
    masks of the new cycle; the new cycle puts those leftovers last so no set repeats a mask.
    """
    rows: list[list[int]] = []
    order = torch.randperm(sigma, generator=generator).tolist()
    cursor = 0
    for _ in range(n_sets):
        if cursor + tau <= sigma:
            rows.append(order[cursor:cursor + tau])
            cursor += tau
            continue
        leftovers = order[cursor:]
        fresh = torch.randperm(sigma, generator=generator).tolist()
        used = set(leftovers)
        order = [i for i in fresh if i not in used] + [i for i in fresh if i in used]
        cursor = tau - len(leftovers)
        rows.append(leftovers + order[:cursor])
    return torch.tensor(rows, dtype=torch.long)


def _cpu_copy(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)


class _ScaledOnce(torch.autograd.Function):
    """``x * scales`` (broadcast into x's shape) computed in ``scales``' wider dtype, rounded once to x's.

    One kernel each way. Scales rounded to bf16 first would bias every kept value (1/0.9 is 1.109375
    in bf16); ``nn.Dropout`` also scales in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scales)
        return _scaled_once(x, scales)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scales,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable in turn
            return _ScaledOnce.apply(grad, scales), None
        return _scaled_once(grad, scales), None


def _scaled_once(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.mul(x, scales, out=torch.empty_like(x))  # computed in the wider dtype, written in x's


def _scale_equal_groups(x: torch.Tensor, scales: torch.Tensor, size: int) -> torch.Tensor:
    """Rows ``[i*size, (i+1)*size)`` of ``x`` times ``scales[i]`` over the last dim, by broadcasting views."""
    groups = scales.shape[0]
    grouped = x.unflatten(0, (groups, size))
    per_group = scales.view((groups,) + (1,) * (x.dim() - 1) + (scales.shape[1],))
    return _ScaledOnce.apply(grouped, per_group).flatten(0, 1)


def _scale_batch_groups(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Split ``x``'s first dim into ``len(scales)`` groups as evenly as possible; scale group i by ``scales[i]``.

    The first ``batch % groups`` groups get one sample more. With fewer samples than groups each
    sample is its own group (the last masks rest this step). No batch-sized mask is built: only the
    ``(groups, features)`` scales are saved for backward.
    """
    groups = scales.shape[0]
    size, larger = divmod(x.shape[0], groups)
    if size == 0:
        return _scale_equal_groups(x, scales[: x.shape[0]], 1)
    if larger == 0:
        return _scale_equal_groups(x, scales, size)
    split = larger * (size + 1)
    return torch.cat([
        _scale_equal_groups(x[:split], scales[:larger], size + 1),
        _scale_equal_groups(x[split:], scales[larger:], size),
    ])


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 scales for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


class GyroDropout(nn.Module):
    """Dropout over ``sigma`` pre-selected feature masks, ``tau`` of them active per step.

    In training the batch (first dim) is split into ``tau`` groups as evenly as possible, and group
    ``i`` is multiplied by active mask ``i`` over the last dim, scaled by ``1 / (1 - p)``; any rank
    works (``[B, F]``, ``[B, T, F]``, ...; a 1-D input is one sample). Evaluation is the identity.
    The masks are built on the CPU at the first training forward, for that input's feature width;
    only the active set's ``(tau, features)`` scales live on the input's device. Kept values are
    ``x * (1 / (1 - p))`` rounded once to x's dtype, as ``nn.Dropout`` computes them.

    When the schedule advances: with ``advance_on_forward=True`` every training-mode forward counts
    as one step (right for one forward per optimizer step; eval forwards never count). With gradient
    accumulation or several forwards per step, pass ``advance_on_forward=False`` and call
    :meth:`advance` once after each optimizer step (the ``slipstream.algorithms.GyroDropout``
    algorithm does this at ``Event.BATCH_END``). Under ``torch.compile`` that manual mode traces
    with no graph break; ``advance_on_forward=True`` costs one graph break per module. Capturing a
    training forward into a CUDA graph in eager mode (``torch.cuda.graph``) raises RuntimeError:
    replays would keep the captured active set.

    Args:
        p: probability of dropping a feature, in [0, 1).
        sigma: number of pre-selected masks (subnetworks).
        tau: masks active at once (batch groups per step), ``1 <= tau <= sigma``.
        iters_per_epoch, max_epoch: planned run length; ``iter_num`` follows from their product.
        seed: seeds the module's own generator. ``None`` draws one from torch's default generator,
            so it follows ``torch.manual_seed``; give the same seed on every DDP rank (the
            functional API and algorithm do) so that all ranks hold the same masks.
        advance_on_forward: see above.

    Example:
        >>> drop = GyroDropout(p=0.5, sigma=8, tau=4, iters_per_epoch=10, max_epoch=2, seed=0)
        >>> y = drop(torch.ones(6, 3, 5))   # groups of 2, 2, 1, 1 samples
        >>> sorted(set(y.unique().tolist()))
        [0.0, 2.0]
        >>> drop.iter_num, drop.step
        (8, 1)
    """

    def __init__(
        self,
        p: float = 0.5,
        sigma: int = 256,
        tau: int = 16,
        iters_per_epoch: int = 196,
        max_epoch: Union[int, float] = 100,
        seed: Optional[int] = None,
        advance_on_forward: bool = True,
    ) -> None:
        super().__init__()
        check_gyro_arguments(p, sigma, tau)
        check_run_length(iters_per_epoch, max_epoch)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be a non-negative int or None, got {type(seed).__name__}")
        elif seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed}")
        self.p = float(p)
        self.sigma = sigma
        self.tau = tau
        self.iters_per_epoch = iters_per_epoch
        self.max_epoch = max_epoch
        self.seed = seed
        self.advance_on_forward = bool(advance_on_forward)
        self.step = 0
        # (sigma, features) bool and (sets, tau) indices; None until the first training forward.
        self.masks: Optional[torch.Tensor] = None
        self.schedule: Optional[torch.Tensor] = None
        # The active set's scales (0 or 1 / (1 - p); fp32, fp64 for fp64 input) on the input's device:
        # rebuilt only when the set changes.
        self.register_buffer("_scales", torch.empty(0), persistent=False)

    @classmethod
    def from_module(
        cls,
        module: nn.Dropout,
        sigma: int = 256,
        tau: int = 16,
        iters_per_epoch: int = 196,
        max_epoch: Union[int, float] = 100,
        p: Optional[float] = None,
        seed: Optional[int] = None,
        advance_on_forward: bool = True,
    ) -> "GyroDropout":
        """A replacement for ``module`` (an ``nn.Dropout``) keeping its ``p`` unless ``p`` is given.

        Example:
            >>> GyroDropout.from_module(nn.Dropout(0.1), sigma=16, tau=4, seed=0).p
            0.1
        """
        p = float(module.p) if p is None else p  # nn.Dropout takes NumPy floats too
        return cls(p, sigma, tau, iters_per_epoch, max_epoch, seed, advance_on_forward)

    # ----- schedule -------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Planned optimizer steps, ``iters_per_epoch * max_epoch`` (at least 1)."""
        return max(1, round(self.iters_per_epoch * self.max_epoch))

    @property
    def iter_num(self) -> int:
        """Steps between changes of the active set: ``floor(total_steps / sigma) * tau``, never 0."""
        return max(1, (self.total_steps // self.sigma) * self.tau)

    @property
    def materialized(self) -> bool:
        """Whether the masks and schedule exist yet (after the first training forward or a load)."""
        return self.masks is not None

    @property
    def active_indices(self) -> list[int]:
        """Indices (into ``masks``) of the ``tau`` masks active at the current step."""
        if not self.materialized:
            raise RuntimeError("GyroDropout has no masks yet: they are built on the first training forward")
        return self.schedule[self._active_set()].tolist()

    def _active_set(self) -> int:
        return (self.step // self.iter_num) % self.schedule.shape[0]

    def set_run_length(self, iters_per_epoch: int, max_epoch: Union[int, float]) -> None:
        """Plan the schedule for ``iters_per_epoch * max_epoch`` steps (before the masks exist).

        Once the masks and schedule exist (trained or loaded), a different plan is ignored with a
        warning, so that a resumed run keeps the schedule it started with.

        Example:
            >>> drop = GyroDropout(sigma=16, tau=4, seed=0)
            >>> drop.set_run_length(iters_per_epoch=50, max_epoch=3)
            >>> drop.iter_num
            36
        """
        check_run_length(iters_per_epoch, max_epoch)
        if not self.materialized:
            self.iters_per_epoch, self.max_epoch = iters_per_epoch, max_epoch
        elif round(iters_per_epoch * max_epoch) != round(self.iters_per_epoch * self.max_epoch):
            warnings.warn(
                f"GyroDropout keeps the schedule it built for {self.total_steps} steps; "
                f"ignoring the new plan of {iters_per_epoch} x {max_epoch}",
                stacklevel=2,
            )

    @torch.compiler.disable
    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` optimizer steps; switch to the next active set when its time comes.

        Example:
            >>> drop = GyroDropout(sigma=4, tau=2, iters_per_epoch=4, max_epoch=1, seed=0, advance_on_forward=False)
            >>> drop.advance(); drop.step
            1
        """
        before = self._active_set() if self.materialized else None
        self.step += steps
        if before is not None and self._active_set() != before and self._scales.dim() == 2:
            self._build_scales(self._scales.dtype, self._scales.device)

    # ----- forward --------------------------------------------------------------------------------

    def _materialize(self, features: int) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.masks = torch.rand(self.sigma, features, generator=generator) >= self.p
        n_sets = math.ceil(self.total_steps / self.iter_num)
        self.schedule = _permutation_walk(self.sigma, self.tau, n_sets, generator)

    def _build_scales(self, dtype: torch.dtype, device: torch.device) -> None:
        keep = self.masks[self.schedule[self._active_set()]]
        self._scales = (keep.to(dtype) * (1.0 / (1.0 - self.p))).to(device)

    @torch.compiler.disable
    def _prepare(self, x: torch.Tensor) -> None:
        """Build masks on first use, then the active scales in the input's scale dtype, on its device."""
        features = x.shape[-1]
        if not self.materialized:
            self._materialize(features)
        elif self.masks.shape[1] != features:
            raise ValueError(
                f"GyroDropout built its masks for {self.masks.shape[1]} features but got an input whose last "
                f"dimension is {features}; Gyro Dropout needs a fixed feature width"
            )
        self._build_scales(_scale_dtype(x.dtype), x.device)

    def _ready_for(self, x: torch.Tensor) -> bool:
        scales = self._scales
        return (
            scales.dim() == 2 and scales.shape[1] == x.shape[-1]
            and scales.dtype == _scale_dtype(x.dtype) and scales.device == x.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.dim() == 0:
            raise ValueError("GyroDropout needs an input with at least one dimension (features last)")
        refuse_eager_cuda_graph_capture("GyroDropout", x)
        if not self._ready_for(x):
            self._prepare(x)
        if x.dim() == 1:
            y = _scale_batch_groups(x.unsqueeze(0), self._scales).squeeze(0)
        else:
            y = _scale_batch_groups(x, self._scales)
        if self.advance_on_forward:
            self.advance()
        return y

    # ----- state ----------------------------------------------------------------------------------

    def run_state(self) -> dict:
        """Masks, schedule, step counter and seed (see :mod:`slipstream.nn.run_state`)."""
        return dict(
            step=self.step, seed=self.seed, p=self.p, sigma=self.sigma, tau=self.tau,
            iters_per_epoch=self.iters_per_epoch, max_epoch=self.max_epoch,
            masks=self.masks, schedule=self.schedule,
        )

    def load_run_state(self, state: dict) -> None:
        """Continue from what :meth:`run_state` returned (same ``p``, ``sigma`` and ``tau`` required)."""
        for name in ("p", "sigma", "tau"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"GyroDropout checkpoint has {name}={state[name]}, this module has {name}={getattr(self, name)}"
                )
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.iters_per_epoch, self.max_epoch = state["iters_per_epoch"], state["max_epoch"]
        self.masks, self.schedule = _cpu_copy(state["masks"]), _cpu_copy(state["schedule"])
        self._scales = torch.empty(0, device=self._scales.device)  # rebuilt on the next training forward

    def extra_repr(self) -> str:
        return f"p={self.p}, sigma={self.sigma}, tau={self.tau}, iter_num={self.iter_num}, step={self.step}"
