"""slipstream: drop-in training speed-ups for PyTorch, applied by model surgery, backed by Triton kernels.

Example:
    >>> import slipstream.functional as sf
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    >>> len(sf.apply_low_precision_layernorm(model))
    1
"""

from slipstream.precision import PRECISIONS
from slipstream.surgery import NoEffectWarning, SurgeryWarning, replace_module_classes

__version__ = "0.1.0"

__all__ = ["__version__", "PRECISIONS", "NoEffectWarning", "SurgeryWarning", "replace_module_classes", "Trainer"]


def __getattr__(name: str):
    # The Trainer is imported on first use, so `import slipstream` stays light.
    if name == "Trainer":
        from slipstream.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'slipstream' has no attribute {name!r}")
