"""SeededDropout: a drop-in ``nn.Dropout`` whose only per-call state is one int64 seed.

The mask is regenerated from the seed in backward (:func:`slipstream.ops.seeded_dropout`), so no
mask is kept for autograd. Seeds come from a :class:`~slipstream.nn.seed_stream.SeedStream` the
module owns. Its ``state_dict`` is ``nn.Dropout``'s (empty), so checkpoints load both ways; the
stream's position is run state (:mod:`slipstream.nn.run_state`), which a resumed run loads to draw
the same seeds. The stream replays them when ``torch.utils.checkpoint`` recomputes the forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from slipstream.nn._capture import refuse_eager_cuda_graph_capture
from slipstream.nn.seed_stream import SeedStream, check_int64
from slipstream.ops.dropout import seeded_dropout

__all__ = ["SeededDropout"]

def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1], got {type(p).__name__} {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1], got {p}")
    return float(p)


class SeededDropout(nn.Module):
    """Dropout with a seeded, regenerated mask: no per-element state is saved for backward.

    Same math as ``nn.Dropout(p)``: in training, each element is zeroed with probability ``p``
    (rounded to a multiple of ``2**-16``) and kept ones are scaled by ``1 / (1 - p)``; in eval mode,
    and for ``p=0``, it returns its input. Each call draws a fresh seed from the module's own
    stream, keyed by ``seed`` (default: drawn from torch's global RNG, so ``torch.manual_seed``
    makes runs reproducible). ``inplace`` is accepted for compatibility; the result is always a new
    tensor. Under ``torch.compile`` the stream advances inside the graph; by default
    (``slipstream.config.compiled_dropout = "inductor"``) each call's mask comes from a hashed stream
    that Inductor fuses (see :mod:`slipstream.ops.hashed_dropout`), not the Philox kernel's. CUDA
    graphs: ``torch.compile(mode="reduce-overhead")`` draws a new mask every replay; capturing the
    module in eager mode (``torch.cuda.graph``) raises RuntimeError, since replays would reuse one mask.

    Example:
        >>> drop = SeededDropout(p=0.5, seed=0)
        >>> x = torch.randn(4, 8)
        >>> y = drop(x)
        >>> bool(((y == 0) | torch.isclose(y, 2 * x)).all())
        True
        >>> drop.eval()(x) is x
        True
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, seed: Optional[int] = None) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.inplace = bool(inplace)
        key = int(torch.randint(0, 2**63 - 1, ())) if seed is None else check_int64("seed", seed)
        self._seeds = SeedStream(key)

    @classmethod
    def from_module(cls, module: nn.Dropout, seed: Optional[int] = None) -> "SeededDropout":
        """A SeededDropout with ``module``'s ``p``, ``inplace`` and training mode.

        Example:
            >>> SeededDropout.from_module(nn.Dropout(0.1), seed=3).p
            0.1
        """
        if not isinstance(module, nn.Dropout):
            raise TypeError(f"module must be an nn.Dropout, got {type(module).__name__}")
        new = cls(float(module.p), inplace=module.inplace, seed=seed)  # nn.Dropout takes NumPy floats too
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        refuse_eager_cuda_graph_capture("SeededDropout", x)
        return seeded_dropout(x, self.p, self._seeds.next(), on_backward=self._seeds.backward_reached)

    def run_state(self) -> dict[str, int]:
        """The seed stream's position, ``{'key': ..., 'calls': ...}`` (see :mod:`slipstream.nn.run_state`)."""
        return self._seeds.state_dict()

    def load_run_state(self, state: dict[str, int]) -> None:
        """Continue the seed stream :meth:`run_state` returned."""
        self._seeds.load_state_dict(state)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
