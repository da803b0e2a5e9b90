"""The slipstream Trainer: events, algorithms, precision, evaluation, checkpoints, torchrun/DDP.

Example:
    >>> from slipstream.trainer import Trainer, SlipstreamModel, JSONLinesLogger
"""

from slipstream.trainer.loggers import ConsoleLogger, InMemoryLogger, JSONLinesLogger, Logger
from slipstream.trainer.metrics import accuracy_counts
from slipstream.trainer.model import SlipstreamModel
from slipstream.trainer.trainer import Trainer

__all__ = ["Trainer", "SlipstreamModel", "Logger", "ConsoleLogger", "JSONLinesLogger", "InMemoryLogger",
           "accuracy_counts"]
