"""A guard for modules whose randomness is drawn on the host: CUDA graph capture would freeze it."""

from __future__ import annotations

import torch


def refuse_eager_cuda_graph_capture(module: str, x: torch.Tensor) -> None:
    """RuntimeError if ``x``'s GPU stream is being captured into a CUDA graph outside ``torch.compile``.

    ``module`` draws its randomness on the host each call (a seed, an active mask set); a captured
    graph keeps the launch arguments and tensors of the capture, so every replay would reuse the
    captured mask: a silent change of the method. Under ``torch.compile`` the draw is part of the
    graph, so ``mode="reduce-overhead"`` is the supported way to use CUDA graphs.
    """
    if x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{module} cannot be captured into a CUDA graph in eager mode (torch.cuda.graph, "
            f"make_graphed_callables): it draws new randomness on the host every call, and every replay "
            f"would reuse the captured mask. Use torch.compile(model, mode='reduce-overhead') for CUDA "
            f"graphs, or nn.Dropout inside the captured region"
        )
