"""End-to-end benchmark: real model families trained with slipstream methods vs eager and torch.compile.

For each model (Hugging Face GPT-2 small and BERT-base, timm convnext_tiny and resnet50_gn, diffusers'
UNet2DModel; random weights, synthetic batches, bf16 autocast, fused AdamW, channels_last CNNs) it
trains these configurations, each built fresh from the same seed:

* ``eager`` and ``compile`` (torch.compile) baselines;
* each applicable slipstream method alone (``apply_*`` functions found in ``slipstream.functional``
  at run time; applicable = it replaced at least one module of this model);
* ``all`` applicable methods together, and ``all+compile``;
* on request, ``all-triton-launch``: ``all`` with ``slipstream.config.eager_launch = "triton"`` (Triton's
  own launch path instead of slipstream's cached one), to time what the cached launches save;
* on request, ``all+compile-kernel-norms``: ``all+compile`` with ``slipstream.config.compiled_layer_norm``
  and ``compiled_group_norm`` set to ``"kernel"`` (slipstream's norm kernels in the compiled graph)
  instead of their default ``"inductor"`` (the norms traced as PyTorch math that Inductor fuses);
* on request, ``all+compile-kernel-dropout``: ``all+compile`` with ``slipstream.config.compiled_dropout
  = "kernel"`` (the Philox kernel launched on its own) instead of its default ``"inductor"``
  (SeededDropout's mask as hashed PyTorch ops that Inductor fuses and recomputes in backward);
* on request, ``compile-cudagraphs`` and ``all+compile-cudagraphs``: ``compile`` and ``all+compile`` with
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs replay the compiled step: no host cost per
  launch), the way out of host-bound steps that PyTorch offers.

Configurations are interleaved: each round runs every configuration once (a few untimed steps, then
``--steps`` timed ones); step time is the median over rounds of each round's median, with the min-max
of round medians as its spread. Compiled configurations compile once, in the warm-up before round 1.

Usage (repo root)::

    PYTHONPATH=. python benchmarks/end_to_end.py --out $OUT/end_to_end.md --json $OUT/end_to_end.json
    PYTHONPATH=. python benchmarks/end_to_end.py --models gpt2,bert --steps 20 --rounds 3
    PYTHONPATH=. python benchmarks/end_to_end.py --models gpt2 --profile $OUT/profile.md   # where time goes
    PYTHONPATH=. python benchmarks/end_to_end.py --loss-curve --png $OUT/loss_curve.png
    PYTHONPATH=. python benchmarks/end_to_end.py --models gpt2 --batch-scale 4    # 32 x 512: GPU-bound
    PYTHONPATH=. python benchmarks/end_to_end.py --quick --configs eager,methods,all   # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import traceback
from typing import Optional, Sequence

import torch

from benchmarks.common import command_line, environment_line, write_section
from benchmarks.end_to_end_loss_curve import run_loss_curve
from benchmarks.end_to_end_models import MODELS, ModelSpec, model_names
from benchmarks.end_to_end_profile import profile_trainee
from benchmarks.end_to_end_report import model_section
from benchmarks.end_to_end_training import (
    Config, MethodFn, Trainee, batch_pool, discover_methods, dropout_mask_bytes, free_device_memory,
)

CONFIG_KINDS = ("eager", "compile", "methods", "all", "all+compile", "all-triton-launch", "all+compile-kernel-norms",
                "all+compile-kernel-dropout", "compile-cudagraphs", "all+compile-cudagraphs")
DEFAULT_CONFIG_KINDS = CONFIG_KINDS[:5]  # the last ones run on request


def _csv(allowed: Sequence[str], argument: str):
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        unknown = [t for t in items if t not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{argument}: {unknown or text!r} not in {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv(model_names(), "--models"), default=model_names())
    parser.add_argument("--configs", type=_csv(CONFIG_KINDS, "--configs"), default=list(DEFAULT_CONFIG_KINDS))
    parser.add_argument("--methods", type=lambda s: [t for t in s.split(",") if t], default=None,
                        help="method names (without apply_) to use, in the order 'all' applies them; "
                             "default: every apply_* in slipstream.functional")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before round 1 (compiles here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="each batch joins this many standard batches (a GPU-bound step on a slow host)")
    parser.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke run)")
    parser.add_argument("--out", help="write the markdown results here")
    parser.add_argument("--json", help="write the raw results (every step time) here")
    parser.add_argument("--profile", help="after the rounds, profile a few steps of each configuration; "
                                          "write top kernels, host time and host syncs here (markdown)")
    parser.add_argument("--loss-curve", action="store_true",
                        help="instead: loss curves with and without all methods, at --curve-seeds seeds")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--curve-seeds", type=int, default=3, help="--loss-curve seeds (>= 2)")
    parser.add_argument("--png", default="end_to_end_loss_curve.png", help="--loss-curve plot")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "curve_steps", "batch_scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.curve_seeds < 2:
        parser.error("--curve-seeds must be >= 2: the seed noise is a gap between two baseline seeds")
    if not args.quick and not torch.cuda.is_available():
        parser.error("full-size models need a CUDA GPU; use --quick for a CPU smoke run")
    return args


def select_methods(requested: Optional[list[str]]) -> dict[str, MethodFn]:
    """The discovered methods, or the ``requested`` ones in the requested order (unknown: ValueError)."""
    found = discover_methods()
    if requested is None:
        return found
    unknown = [m for m in requested if m not in found]
    if unknown:
        raise ValueError(f"--methods: {unknown} not in slipstream.functional; found: {', '.join(found)}")
    return {m: found[m] for m in requested}


def _configs(kinds: Sequence[str], applicable: list[str]) -> list[Config]:
    """The configurations to time. With one applicable method, 'all' is that method alone."""
    configs = [Config(kind, (), kind == "compile") for kind in ("eager", "compile") if kind in kinds]
    if "methods" in kinds and (len(applicable) > 1 or "all" not in kinds):
        configs += [Config(m, (m,), False) for m in applicable]
    if applicable:
        configs += [Config(kind, tuple(applicable), kind == "all+compile")
                    for kind in ("all", "all+compile") if kind in kinds]
        if "all-triton-launch" in kinds:
            configs.append(Config("all, Triton launch", tuple(applicable), False, eager_launch="triton"))
        if "all+compile-kernel-norms" in kinds:
            configs.append(Config("all+compile, kernel norms", tuple(applicable), True,
                                  compiled_layer_norm="kernel", compiled_group_norm="kernel"))
        if "all+compile-kernel-dropout" in kinds:
            configs.append(Config("all+compile, kernel dropout", tuple(applicable), True, compiled_dropout="kernel"))
    if "compile-cudagraphs" in kinds:
        configs.append(Config("compile, CUDA graphs", (), True, compile_mode="reduce-overhead"))
    if applicable and "all+compile-cudagraphs" in kinds:
        configs.append(Config("all+compile, CUDA graphs", tuple(applicable), True, compile_mode="reduce-overhead"))
    return configs


def _config_result(trainee: Trainee) -> dict:
    medians = trainee.round_medians()
    median = statistics.median(medians)
    return {
        "name": trainee.config.name,
        "methods": list(trainee.config.methods),
        "compiled": trainee.config.compiled,
        "surgery": {m: r.summary() for m, r in trainee.surgery.items()},
        "round_step_ms": trainee.round_step_ms,
        "round_median_ms": medians,
        "median_ms": median,
        "min_ms": min(medians),
        "max_ms": max(medians),
        "throughput": trainee.spec.items_per_batch(trainee.batches[0]) / median * 1e3,
        "peak_bytes": trainee.peak_bytes,
        "state_bytes": trainee.state_bytes,
        "final_loss": trainee.final_loss(),
        "step_losses": trainee.step_losses(),
        "graph_breaks": trainee.graph_breaks,
        "graphs": trainee.graphs,
    }


def benchmark_model(spec: ModelSpec, args: argparse.Namespace, methods: dict[str, MethodFn],
                    device: torch.device) -> dict:
    """Train every configuration of one model in interleaved rounds; return its results (JSON-able)."""
    batches = batch_pool(spec, args.quick, device, scale=args.batch_scale)

    def build(config: Config) -> Trainee:
        return Trainee(spec, config, methods, batches, device, args.quick, args.seed)

    # Each method alone on a fresh model: the surgery report, and which methods apply to this model.
    surgery = {name: build(Config(name, (name,), False)).surgery[name] for name in methods}
    applicable = [name for name, record in surgery.items() if record.replaced > 0]
    free_device_memory()
    eager_model = build(Config("probe", (), False)).model
    mask_bytes = dropout_mask_bytes(spec, eager_model, batches[0], device)
    del eager_model
    free_device_memory()

    trainees, failed = [], {}
    for config in _configs(args.configs, applicable):
        print(f"[{spec.name}] build and warm up {config.name}", flush=True)
        try:
            trainee = build(config)
            trainee.warm_up(args.warmup)
            trainees.append(trainee)
        except Exception as error:  # a method or compile that breaks: report it, time the others
            traceback.print_exc()
            failed[config.name] = f"{type(error).__name__}: {error}"
            free_device_memory()
    for r in range(args.rounds):
        # Rotate the order every round so no configuration always runs right after the same other one.
        for trainee in trainees[r % len(trainees):] + trainees[:r % len(trainees)]:
            trainee.run_round(args.steps)
        print(f"[{spec.name}] round {r + 1}/{args.rounds} done", flush=True)
    result = {
        "model": spec.name,
        "batch": spec.describe(batches[0]),
        "unit": spec.unit,
        "steps": args.steps,
        "rounds": args.rounds,
        "loss_steps": trainees[0].steps_done if trainees else 0,
        "dropout_mask_bytes": mask_bytes,
        "surgery": {m: r.summary() for m, r in surgery.items()},
        "applicable": applicable,
        "configs": [_config_result(t) for t in trainees],
        "failed": failed,
    }
    if args.profile:  # after the results: profiling steps are not counted in them
        result["profiles"] = {t.config.name: profile_trainee(t) for t in trainees}
    del trainees
    free_device_memory()
    return result


def _versions_line() -> str:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return "; ".join(f"{p} {version(p)}" for p in ("transformers", "timm", "diffusers"))


def _write_json(path: Optional[str], payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def _write_profiles(path: Optional[str], results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            for result in results:
                for config, text in result.get("profiles", {}).items():
                    f.write(f"## {result['model']}: {config}\n\n{text}\n")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark (or the loss-curve check) and return its results."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # Several compiled copies of one model class live side by side; let each keep its own graph.
    torch._dynamo.config.recompile_limit = 64
    methods = select_methods(args.methods)
    env = f"{environment_line(command_line())}\n\n{_versions_line()}; methods found: {', '.join(methods) or 'none'}"
    if args.loss_curve:
        result = run_loss_curve(MODELS[args.models[0]], args, methods, device, env)
        _write_json(args.json, result)
        return result
    results = []
    for name in args.models:
        spec = MODELS[name]
        if not spec.available():
            results.append({"model": name, "skipped": f"package {spec.package!r} is not installed"})
        else:
            try:
                results.append(benchmark_model(spec, args, methods, device))
            except Exception as error:  # keep the other models' results
                traceback.print_exc()
                results.append({"model": name, "skipped": f"failed: {type(error).__name__}: {error}"})
                free_device_memory()
        print(model_section(results[-1]), flush=True)
        _write_json(args.json, {"environment": env, "models": results})
        _write_profiles(args.profile, results)
    if args.rounds < 3:
        env += "\n\nFewer than 3 rounds: the spreads say little."
    write_section(args.out, "End-to-end training", env, "\n".join(model_section(r) for r in results))
    return {"environment": env, "models": results}


if __name__ == "__main__":
    main()
