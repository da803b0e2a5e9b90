"""The model contract: how the Trainer runs a forward pass, gets a loss and counts metrics.

Three kinds of model are accepted:

(a) a :class:`SlipstreamModel`: ``forward(batch)`` takes the whole batch, ``loss(outputs, batch)``
    returns the loss, and ``eval_metrics(outputs, batch)`` optionally adds metrics;
(b) any plain ``nn.Module`` fed ``(inputs, targets)`` batches: ``model(inputs)``, then
    ``loss_fn(outputs, targets)`` (cross-entropy by default) and accuracy when the outputs are logits;
(c) a Hugging Face-style model fed dict batches: ``model(**batch)``, whose output carries ``.loss``
    (and ``.logits``, used for accuracy against ``batch['labels']``, shifted one token for Hugging
    Face causal LMs, whose logits at position t predict the label at t + 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.trainer.metrics import MetricCounts, accuracy_counts

__all__ = ["SlipstreamModel", "ModelAdapter", "adapter_for"]

LossFunction = Callable[[Any, Any], torch.Tensor]


class SlipstreamModel(nn.Module):
    """Base class for models that own their loss: ``forward(batch)``, ``loss(outputs, batch)``.

    Example:
        >>> class Classifier(SlipstreamModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 3)
        ...     def forward(self, batch):
        ...         return self.net(batch[0])
        ...     def loss(self, outputs, batch):
        ...         return F.cross_entropy(outputs, batch[1])
        ...     def eval_metrics(self, outputs, batch):
        ...         return {'accuracy': accuracy_counts(outputs, batch[1])}
        >>> model = Classifier()
        >>> batch = (torch.randn(2, 4), torch.tensor([0, 2]))
        >>> model.loss(model(batch), batch).shape
        torch.Size([])
    """

    def forward(self, batch: Any) -> Any:
        """Outputs for a whole batch, as the dataloader yields it (moved to the device)."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``outputs`` for ``batch``."""
        raise NotImplementedError

    def eval_metrics(self, outputs: Any, batch: Any) -> dict[str, MetricCounts]:
        """Extra evaluation metrics as ``{name: (sum, count)}`` (the Trainer always reports the loss)."""
        return {}


class ModelAdapter:
    """How the Trainer drives one kind of model. ``module`` may be the DDP wrapper; ``model`` is bare."""

    def forward(self, module: nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_metrics(self, model: nn.Module, outputs: Any, batch: Any) -> dict[str, MetricCounts]:
        raise NotImplementedError


class _SlipstreamModelAdapter(ModelAdapter):
    def forward(self, module: nn.Module, batch: Any) -> Any:
        return module(batch)

    def loss(self, model: nn.Module, outputs: Any, batch: Any) -> torch.Tensor:
        return _checked_loss(model.loss(outputs, batch))

    def eval_metrics(self, model: nn.Module, outputs: Any, batch: Any) -> dict[str, MetricCounts]:
        return dict(model.eval_metrics(outputs, batch))


class _PlainModuleAdapter(ModelAdapter):
    """``(inputs, targets)`` batches with ``loss_fn``, or dict batches for models returning ``.loss``."""

    def __init__(self, loss_fn: LossFunction):
        self.loss_fn = loss_fn

    def forward(self, module: nn.Module, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return module(**batch)
        return module(_inputs_and_targets(batch)[0])

    def loss(self, model: nn.Module, outputs: Any, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping):
            return _checked_loss(self.loss_fn(outputs, _inputs_and_targets(batch)[1]))
        loss = _output_field(outputs, "loss")
        if loss is None:
            raise ValueError(
                f"the model returned {type(outputs).__name__} without a 'loss' for a dict batch. Models fed "
                "dict batches must return an output with .loss (Hugging Face style: pass 'labels' in the "
                "batch); otherwise subclass slipstream.trainer.SlipstreamModel and define loss(outputs, batch)"
            )
        return _checked_loss(loss)

    def eval_metrics(self, model: nn.Module, outputs: Any, batch: Any) -> dict[str, MetricCounts]:
        if isinstance(batch, Mapping):
            logits, targets = _output_field(outputs, "logits"), batch.get("labels")
            if _predicts_next_token(model) and isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor):
                logits, targets = logits[:, :-1], targets[:, 1:]  # as the model's own loss shifts them
        else:
            logits, targets = outputs, _inputs_and_targets(batch)[1]
        counts = accuracy_counts(logits, targets)
        return {} if counts is None else {"accuracy": counts}


def _predicts_next_token(model: nn.Module) -> bool:
    """A Hugging Face causal LM: its logits at position t score the label at t + 1."""
    if not type(model).__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _output_field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _inputs_and_targets(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of length {len(batch)}" if isinstance(batch, Sequence) else ""
    raise ValueError(
        f"a plain nn.Module is trained on (inputs, targets) batches or on dict batches (Hugging Face "
        f"style), got a {type(batch).__name__}{size}; for other batch layouts subclass "
        "slipstream.trainer.SlipstreamModel and define forward(batch) and loss(outputs, batch)"
    )


def _checked_loss(loss: Any) -> torch.Tensor:
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
        described = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a floating-point scalar tensor, got {described}")
    return loss.reshape(())


def adapter_for(model: nn.Module, loss_fn: Optional[LossFunction] = None) -> ModelAdapter:
    """The adapter that drives ``model`` (see this module's docstring); checks the contract.

    Example:
        >>> type(adapter_for(nn.Linear(4, 2))).__name__
        '_PlainModuleAdapter'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    if isinstance(model, SlipstreamModel):
        if type(model).loss is SlipstreamModel.loss:
            raise TypeError(f"{type(model).__name__} subclasses SlipstreamModel but does not define "
                            "loss(outputs, batch)")
        if loss_fn is not None:
            raise ValueError("loss_fn is for plain nn.Modules; a SlipstreamModel computes its own loss(outputs, batch)")
        return _SlipstreamModelAdapter()
    return _PlainModuleAdapter(F.cross_entropy if loss_fn is None else loss_fn)
