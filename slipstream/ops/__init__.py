"""Plain tensor ops backed by Triton kernels, with pure-PyTorch fallbacks."""

from slipstream.ops.dropout import seeded_dropout, seeded_dropout_rows
from slipstream.ops.group_norm import group_norm
from slipstream.ops.layer_norm import layer_norm

__all__: list[str] = ["layer_norm", "seeded_dropout", "seeded_dropout_rows", "group_norm"]
