"""Plain tensor ops backed by Triton kernels, with pure-PyTorch fallbacks."""

__all__: list[str] = []
