"""One torchrun job of the DDP scaling benchmark: GPT-2 small (or BERT-base) trained by the Trainer.

Every rank builds the model from the same seed, a DataLoader over synthetic token sequences (the
end-to-end benchmark's learnable bigram language) sized so the run is exactly one epoch of
``--steps`` batches per rank, and a Trainer in ``amp_bf16`` with fused AdamW. A :class:`StepTimer`
marks the end of every batch after the warm-up (CUDA events, read back once at the end), so the
timing adds no host sync to the loop. Rank 0 writes throughput, step times and every rank's peak
memory as JSON to ``--results``. ``benchmarks/ddp_scaling.py`` launches it; by hand:

    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_scaling_worker.py --methods on --results r.json
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_scaling_worker.py --tiny --device cpu \
        --steps 3 --warmup 1 --methods on --results r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset

from benchmarks.end_to_end_models import MODELS, Batch, ModelSpec
from benchmarks.end_to_end_training import StepClock, batch_pool
from benchmarks.torchrun_launcher import MULTICAST_OFF
from slipstream.algorithms import Algorithm, Event, FusedLayerNorm, LowMemoryDropout, LowPrecisionLayerNorm, State
from slipstream.trainer import InMemoryLogger, Trainer
from slipstream.trainer.distributed import all_gather_object, resolve_device

__all__ = ["MODEL_NAMES", "NORMS", "DEFAULT_NORM", "PRECISION", "add_run_arguments", "run_arguments",
           "check_run_arguments", "method_algorithms", "SamplePool", "synthetic_loader", "StepTimer",
           "build_trainer", "run", "leave_process_group"]

MODEL_NAMES = ("gpt2", "bert")
PRECISION = "amp_bf16"

# The LayerNorm method of "methods on". Low Precision LayerNorm by default: in the end-to-end
# benchmark's GPT-2 run (docs/results/end_to_end_lm.md, H100) it was the faster of the two (0.78x
# vs 0.70x of eager alone).
NORMS = {"fused": FusedLayerNorm, "low_precision": LowPrecisionLayerNorm}
DEFAULT_NORM = "low_precision"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of one run that the launcher passes through to every job unchanged.

    Example:
        >>> parser = argparse.ArgumentParser(); add_run_arguments(parser)
        >>> parser.parse_args(['--tiny']).batch_per_gpu
        16
    """
    parser.add_argument("--model", choices=MODEL_NAMES, default="gpt2")
    parser.add_argument("--steps", type=int, default=200, help="training batches per job, warm-up included")
    parser.add_argument("--warmup", type=int, default=40, help="first batches left out of the timing")
    parser.add_argument("--batch-per-gpu", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--norm", choices=sorted(NORMS), default=DEFAULT_NORM, help="the LayerNorm method of 'on'")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 (CPU smoke runs)")
    parser.add_argument("--seed", type=int, default=0)


def run_arguments(args: argparse.Namespace) -> list[str]:
    """``args``' run arguments (those of :func:`add_run_arguments`) as a command line again.

    Example:
        >>> parser = argparse.ArgumentParser(); add_run_arguments(parser)
        >>> run_arguments(parser.parse_args(['--tiny', '--steps', '3']))[:4]
        ['--model', 'gpt2', '--steps', '3']
    """
    argv = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-per-gpu", str(args.batch_per_gpu), "--norm", args.norm, "--device", args.device,
            "--seed", str(args.seed)]
    return argv + (["--tiny"] if args.tiny else [])


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when the run arguments cannot make a timed run."""
    if args.batch_per_gpu < 1:
        parser.error(f"--batch-per-gpu must be at least 1, got {args.batch_per_gpu}")
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup must be at least 1 and below --steps ({args.steps}), got {args.warmup}")


def method_algorithms(methods_on: bool, norm: str) -> list[Algorithm]:
    """The slipstream algorithms of a run: none, or the LayerNorm method ``norm`` and LowMemoryDropout.

    The dropout seeds come from torch's generator, which the Trainer seeds with ``seed + rank``
    before surgery: reproducible, and a different mask stream on every rank, as in real training.

    Example:
        >>> method_algorithms(True, 'low_precision')
        [LowPrecisionLayerNorm(), LowMemoryDropout(seed=None)]
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return [NORMS[norm](), LowMemoryDropout()] if methods_on else []


class SamplePool(Dataset):
    """``length`` samples that cycle through a small pool of distinct ones (data costs nothing to make).

    Example:
        >>> pool = SamplePool({'input_ids': torch.arange(6).view(3, 2)}, length=5)
        >>> len(pool), pool[4]['input_ids'].tolist()
        (5, [2, 3])
    """

    def __init__(self, samples: Batch, length: int):
        self.samples = samples
        self.distinct = len(next(iter(samples.values())))
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        return {key: values[index % self.distinct] for key, values in self.samples.items()}


def synthetic_loader(spec: ModelSpec, tiny: bool, batch_per_gpu: int, steps: int, world_size: int,
                     pin_memory: bool) -> DataLoader:
    """A shuffled loader the Trainer shards into exactly ``steps`` batches of ``batch_per_gpu`` per rank.

    Example:
        >>> loader = synthetic_loader(MODELS['gpt2'], True, batch_per_gpu=4, steps=3, world_size=2, pin_memory=False)
        >>> len(loader.dataset), next(iter(loader))['input_ids'].shape
        (24, torch.Size([4, 32]))
    """
    pool = batch_pool(spec, tiny, torch.device("cpu"))
    samples = {key: torch.cat([batch[key] for batch in pool]) for key in pool[0]}
    dataset = SamplePool(samples, length=steps * batch_per_gpu * world_size)
    return DataLoader(dataset, batch_size=batch_per_gpu, shuffle=True, pin_memory=pin_memory)


class StepTimer(Algorithm):
    """Marks a :class:`StepClock` at ``BATCH_END`` once ``warmup`` batches are done.

    The marks are CUDA events on a GPU, so the loop never waits for them; ``intervals_ms`` reads
    them back (one sync) after training. Under DDP every step ends with the gradient all-reduce, so
    rank 0's step times are the job's.

    Example:
        >>> timer = StepTimer(warmup=1, device=torch.device('cpu'))
        >>> state = State(model=torch.nn.Linear(1, 1)); state.timestamp.batch = 1
        >>> timer.match(Event.BATCH_END, state)
        True
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup = warmup
        self.clock = StepClock(device)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_END and state.timestamp.batch >= self.warmup

    def apply(self, event: Event, state: State, logger: Any) -> None:
        self.clock.mark()


def _modules_replaced(memory: InMemoryLogger) -> dict[str, int]:
    """``{algorithm: modules replaced}`` from what the surgery algorithms logged at INIT."""
    suffix = "/modules_replaced"
    return {name[: -len(suffix)]: int(value) for _, metrics in memory.records
            for name, value in metrics.items() if name.endswith(suffix)}


def _parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--methods", choices=("on", "off"), required=True)
    parser.add_argument("--results", required=True, help="JSON file rank 0 writes")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    return args


def build_trainer(
    args: argparse.Namespace, device: torch.device, world_size: int
) -> tuple[Trainer, StepTimer, InMemoryLogger]:
    """The job's Trainer over a fresh model, with its step timer and the logger rank 0 fills.

    Example:
        >>> args = _parse_args(['--tiny', '--device', 'cpu', '--steps', '2', '--warmup', '1', '--methods', 'on',
        ...                     '--results', 'unused.json'])
        >>> trainer, timer, memory = build_trainer(args, torch.device('cpu'), world_size=1)
        >>> trainer.state.dataloader_len, type(trainer.state.model.transformer.ln_f).__name__
        (2, 'LPLayerNorm')
    """
    spec = MODELS[args.model]
    torch.manual_seed(args.seed)  # the same initial weights in every job
    model = spec.build(args.tiny).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, fused=True)
    loader = synthetic_loader(spec, args.tiny, args.batch_per_gpu, args.steps, world_size,
                              pin_memory=device.type == "cuda")
    timer, memory = StepTimer(args.warmup, device), InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=loader, max_duration=f"{args.steps}ba",
        algorithms=[*method_algorithms(args.methods == "on", args.norm), timer],
        optimizers=optimizer, precision=PRECISION, device=device, seed=args.seed, loggers=[memory],
        progress_bar=False,
    )
    return trainer, timer, memory


def run(argv: Optional[list[str]] = None) -> Optional[dict]:
    """Train one job's configuration; rank 0 writes and returns the results (other ranks: None).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'results.json')
        >>> run(['--tiny', '--device', 'cpu', '--steps', '3', '--warmup', '1', '--methods', 'off',
        ...      '--results', path])['timed_steps']   # doctest: +ELLIPSIS
        [ddp_scaling] gpt2 x1 methods off: ...
        2
    """
    args = _parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before anything touches CUDA, so no rank makes a context on GPU 0
    else:
        torch.set_num_threads(1)  # one core per process, like one GPU per process
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer, timer, memory = build_trainer(args, device, world_size)
    trainer.fit()
    step_ms = timer.clock.intervals_ms()
    peaks = all_gather_object(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    if trainer.state.rank != 0:
        return None
    spec, sample = MODELS[args.model], trainer.state.train_dataloader.dataset[0]
    result = {
        "model": args.model, "tiny": args.tiny, "device": str(device), "world_size": world_size,
        "methods": args.methods, "norm": args.norm, "precision": PRECISION,
        "algorithms": [repr(a) for a in trainer.engine.algorithms if a is not timer],
        "modules_replaced": _modules_replaced(memory),
        "batch_per_gpu": args.batch_per_gpu, "sample_shape": list(sample["input_ids"].shape),
        "steps": args.steps, "warmup": args.warmup, "timed_steps": len(step_ms),
        "step_ms": step_ms, "step_ms_median": statistics.median(step_ms),
        "samples_per_s": args.batch_per_gpu * world_size * len(step_ms) / (sum(step_ms) / 1e3),
        "items_per_sample": spec.items_per_batch({k: v[None] for k, v in sample.items()}), "unit": spec.unit,
        "peak_memory_bytes": peaks, "final_loss": float(trainer.state.loss.detach()),
        "multicast_env": {name: os.environ.get(name) for name in MULTICAST_OFF},  # as this job saw them
    }
    print(f"[ddp_scaling] {args.model} x{world_size} methods {args.methods}: {result['samples_per_s']:.1f} samples/s, "
          f"step {result['step_ms_median']:.2f} ms (median of {len(step_ms)}), final loss {result['final_loss']:.3f}",
          flush=True)
    with open(args.results, "w") as file:
        json.dump(result, file, indent=1)
    return result


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process group, before the interpreter shuts down.

    Left to exit time, gloo's worker threads can abort the process ("terminate called without an
    active exception") when a peer has already gone.

    Example:
        >>> leave_process_group()   # a plain python run: no group to leave
    """
    gc.collect()  # the Trainer's DDP wrapper (in reference cycles) holds the group: free it first
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@record  # under torchrun, a failing rank's traceback is reported as the job's error
def main() -> None:
    run()
    leave_process_group()


if __name__ == "__main__":
    main()
