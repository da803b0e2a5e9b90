"""Training machinery of the end-to-end benchmark: method discovery, surgery records, timed trainees.

A :class:`Trainee` is one configuration of one model (eager or compiled, with some slipstream
methods applied): its own model built from the shared seed, its fused AdamW, and what it measured.
"""

from __future__ import annotations

import gc
import inspect
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from benchmarks.common import slipstream_settings
from benchmarks.end_to_end_models import BATCHES_IN_POOL, Batch, ModelSpec
from slipstream.surgery import SurgeryWarning

__all__ = [
    "METHOD_PREFERENCE",
    "discover_methods",
    "SurgeryRecord",
    "apply_method",
    "Config",
    "Trainee",
    "dropout_mask_bytes",
    "compile_counts",
    "batch_pool",
    "free_device_memory",
]

# Methods that replace the same modules are alternatives: applied together, the first one listed here
# takes the modules and the later ones find nothing left (their count in the surgery report is 0).
# Fused LayerNorm keeps the eager math (fp32 statistics, eager output dtype), so it goes first.
METHOD_PREFERENCE = (
    "fused_layernorm",
    "low_precision_layernorm",
    "low_precision_groupnorm",
    "low_memory_dropout",
    "gyro_dropout",
)

MethodFn = Callable[..., object]


def discover_methods() -> dict[str, MethodFn]:
    """Every ``apply_<method>`` in ``slipstream.functional`` now, keyed by ``<method>``, in preference order.

    Example:
        >>> 'low_precision_layernorm' in discover_methods()
        True
    """
    import slipstream.functional as sf

    found = {name[len("apply_"):]: fn for name, fn in vars(sf).items() if name.startswith("apply_") and callable(fn)}
    rank = {name: i for i, name in enumerate(METHOD_PREFERENCE)}
    return {name: found[name] for name in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))}


@dataclass
class SurgeryRecord:
    """What one ``apply_*`` call did to one model."""

    replaced: int
    by_class: dict[str, int]  # 'LayerNorm->LPLayerNorm': count
    left_alone: list[str]  # classes surgery refused to swap (a subclass with its own forward)
    error: str = ""

    def summary(self) -> str:
        """One line for the surgery report: ``'25 (LayerNorm->LPLayerNorm x25)'``."""
        if self.error:
            return f"failed: {self.error}"
        text = str(self.replaced)
        if self.by_class:
            text += " (" + ", ".join(f"{k} x{v}" for k, v in self.by_class.items()) + ")"
        if self.left_alone:
            text += "; left alone: " + ", ".join(self.left_alone)
        return text


# Arguments the benchmark gives a method when its signature takes them (bf16 autocast everywhere).
def _method_kwargs(fn: MethodFn, seed: int) -> dict:
    offered = {"precision": "amp_bf16", "seed": seed}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in offered.items() if k in params}


_LEFT_ALONE = re.compile(r"surgery left (\S+) alone")


def apply_method(model: nn.Module, fn: MethodFn, seed: int) -> SurgeryRecord:
    """Apply one slipstream method to ``model`` in place and record what it replaced or refused.

    Example:
        >>> import slipstream.functional as sf
        >>> apply_method(nn.Sequential(nn.LayerNorm(4)), sf.apply_low_precision_layernorm, 0).replaced
        1
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(model, **_method_kwargs(fn, seed))
        except (TypeError, ValueError) as error:  # a method this script does not know how to call
            return SurgeryRecord(0, {}, [], f"{type(error).__name__}: {error}")
    left_alone = sorted(
        {_LEFT_ALONE.search(str(w.message)).group(1) for w in caught
         if issubclass(w.category, SurgeryWarning) and _LEFT_ALONE.search(str(w.message))}
    )
    if isinstance(result, dict):
        pairs = Counter(f"{type(old).__name__}->{type(new).__name__}" for old, new in result.items())
        return SurgeryRecord(len(result), dict(pairs), left_alone)
    return SurgeryRecord(int(result), {}, left_alone)


@dataclass(frozen=True)
class Config:
    """One way to train a model: which methods are applied (in order) and whether it is compiled."""

    name: str
    methods: tuple[str, ...]
    compiled: bool
    eager_launch: str = "cached"  # slipstream.config.eager_launch during its steps
    # slipstream.config.compiled_layer_norm / compiled_group_norm during its steps; None: as set
    compiled_layer_norm: Optional[str] = None
    compiled_group_norm: Optional[str] = None
    compiled_dropout: Optional[str] = None  # slipstream.config.compiled_dropout during its steps; None: as set
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs


class LossModule(nn.Module):
    """A model and its loss as one module, so torch.compile sees forward and loss in one graph."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Batch], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(self.model, batch)


class StepClock:
    """Per-step wall times: CUDA events on a GPU (no sync inside the loop), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    moved = {}
    for key, t in batch.items():
        t = t.to(device)
        moved[key] = t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t
    return moved


DATA_SEED = 1234  # the batches are the same for every configuration and every model seed


def batch_pool(spec: ModelSpec, quick: bool, device: torch.device, count: int = BATCHES_IN_POOL,
               scale: int = 1) -> list[Batch]:
    """``count`` synthetic batches of ``spec`` on ``device`` (image tensors in channels_last for the CNNs).

    ``scale``: each batch joins ``scale`` of the model's standard batches (``scale`` times the samples),
    to move a host-bound step towards a GPU-bound one.

    Example:
        >>> from benchmarks.end_to_end_models import MODELS
        >>> pool = batch_pool(MODELS['gpt2'], quick=True, device=torch.device('cpu'), scale=3)
        >>> len(pool), pool[0]['input_ids'].shape[0]
        (4, 6)
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    batches = spec.make_batches(quick, torch.Generator().manual_seed(DATA_SEED), count * scale)
    joined = [{key: torch.cat([b[key] for b in batches[i:i + scale]]) for key in batches[i]}
              for i in range(0, len(batches), scale)]
    return [_to_device(b, device, spec.channels_last) for b in joined]


def free_device_memory() -> None:
    """Drop compiled graphs and cached device memory between models."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) that torch.compile has counted in this process so far."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


FINAL_LOSS_STEPS = 8  # steps the reported final loss is the median of
ROUND_WARMUP_STEPS = 2  # untimed steps at the start of each round: caches re-warm after other configs ran


class Trainee:
    """One configuration of one model: its model, fused AdamW, and its measurements across rounds.

    The model is built fresh from ``seed``, so every configuration of a model starts from the same
    weights and sees the same batches; then ``config``'s methods are applied in order.
    """

    def __init__(
        self, spec: ModelSpec, config: Config, methods: dict[str, MethodFn], batches: list[Batch],
        device: torch.device, quick: bool, seed: int,
    ):
        self.spec, self.config, self.batches, self.device = spec, config, batches, device
        torch.manual_seed(seed)
        with device:
            self.model = spec.build(quick)
        self.model.train()
        if spec.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.surgery = {name: apply_method(self.model, methods[name], seed) for name in config.methods}
        module = LossModule(self.model, spec.loss)
        self.module = torch.compile(module, mode=config.compile_mode) if config.compiled else module
        self.cudagraphs = config.compiled and config.compile_mode == "reduce-overhead"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, fused=True)
        self.steps_done = 0
        self.losses: list[torch.Tensor] = []
        self.round_step_ms: list[list[float]] = []
        self.peak_bytes: Optional[int] = None  # CUDA only
        self.state_bytes = 0
        self.graph_breaks = 0
        self.graphs = 0  # forward graphs torch.compile made: 1 when nothing breaks the graph

    def step(self) -> torch.Tensor:
        """One training step: forward and loss under bf16 autocast, backward, fused AdamW."""
        batch = self.batches[self.steps_done % len(self.batches)]
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        with slipstream_settings(eager_launch=self.config.eager_launch,
                                 compiled_layer_norm=self.config.compiled_layer_norm,
                                 compiled_group_norm=self.config.compiled_group_norm,
                                 compiled_dropout=self.config.compiled_dropout):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.module(batch)
            loss.backward()
        self.optimizer.step()
        # Grads are freed between steps, so each configuration's memory at rest is weights + optimizer state.
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        # A CUDA graph's output lives in memory its next replay overwrites: keep a copy.
        loss = loss.detach().clone() if self.cudagraphs else loss.detach()
        self.losses.append(loss)
        return loss

    def warm_up(self, steps: int) -> None:
        """Untimed first steps (torch.compile compiles here); then record the state this trainee keeps."""
        breaks_before, graphs_before = compile_counts()
        for _ in range(steps):
            self.step()
        breaks, graphs = compile_counts()
        self.graph_breaks, self.graphs = breaks - breaks_before, graphs - graphs_before
        optimizer_state = [t for state in self.optimizer.state.values() for t in state.values()]
        self.state_bytes = _tensor_bytes([*self.model.parameters(), *self.model.buffers(), *optimizer_state])

    def run_round(self, steps: int) -> None:
        """A few untimed steps, then ``steps`` timed ones; records their times and the peak memory."""
        for _ in range(ROUND_WARMUP_STEPS):
            self.step()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            at_rest = torch.cuda.memory_allocated()
        clock = StepClock(self.device)
        clock.mark()
        for _ in range(steps):
            self.step()
            clock.mark()
        self.round_step_ms.append(clock.intervals_ms())
        # CUDA graph replays take their memory from a pool recorded in warm-up, without the allocator,
        # so the allocator's peak misses it (GPT-2 read 1424 MiB against 4002 MiB compiled): not measured.
        if cuda and not self.cudagraphs:
            # Other configurations' weights are resident too: count this one's state plus its step's growth.
            peak = self.state_bytes + torch.cuda.max_memory_allocated() - at_rest
            self.peak_bytes = max(self.peak_bytes or 0, peak)

    def round_medians(self) -> list[float]:
        """Median step time of each round, in milliseconds."""
        return [statistics.median(times) for times in self.round_step_ms]

    def final_loss(self) -> float:
        """Median loss of the last :data:`FINAL_LOSS_STEPS` steps (the lower of the middle two).

        Neither the last step's loss nor a mean: GPT-2 on these batches has a loss spike of one or
        two steps (to about 18.8, back to 6.85 after) near step 31 in every configuration, eager
        included, earlier or later depending on the dropout's random stream
        (``benchmarks/training_agreement.py``). A mean over 8 steps that holds the spike read 9.77
        against eager's 6.87 on the H100 (session 15), whose spike fell one step earlier.
        """
        last = self.losses[-FINAL_LOSS_STEPS:]
        return float(torch.stack(last).float().median())

    def step_losses(self) -> list[float]:
        """The loss of every step run so far, warm-up included, in order (one host sync)."""
        return torch.stack(self.losses).float().tolist() if self.losses else []


def dropout_mask_bytes(spec: ModelSpec, model: nn.Module, batch: Batch, device: torch.device) -> int:
    """Bytes of the masks eager dropout keeps for backward in one step (one byte per element, p > 0).

    Counted with forward hooks on ``nn.Dropout`` modules during one forward pass in training mode.
    """
    total = 0

    def count(module: nn.Module, inputs: tuple) -> None:
        nonlocal total
        if module.p > 0:
            total += inputs[0].numel()

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, nn.Dropout)]
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            spec.loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return total
