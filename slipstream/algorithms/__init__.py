"""Algorithm classes for the slipstream Trainer, one per method."""

from slipstream.algorithms.base import Algorithm, Event, State, SurgeryAlgorithm
from slipstream.algorithms.fused_groupnorm import FusedGroupNorm
from slipstream.algorithms.fused_layernorm import FusedLayerNorm
from slipstream.algorithms.gyro_dropout import GyroDropout
from slipstream.algorithms.low_memory_dropout import LowMemoryDropout
from slipstream.algorithms.low_precision_groupnorm import LowPrecisionGroupNorm
from slipstream.algorithms.low_precision_layernorm import LowPrecisionLayerNorm

__all__ = [
    "Algorithm",
    "Event",
    "State",
    "SurgeryAlgorithm",
    "FusedLayerNorm",
    "FusedGroupNorm",
    "LowPrecisionLayerNorm",
    "LowPrecisionGroupNorm",
    "GyroDropout",
    "LowMemoryDropout",
]
