"""Plain tensor ops backed by Triton kernels, with pure-PyTorch fallbacks."""

from slipstream.ops.layer_norm import layer_norm

__all__: list[str] = ["layer_norm"]
