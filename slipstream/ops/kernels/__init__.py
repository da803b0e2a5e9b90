"""Triton kernels, one module per op family; imported lazily, only when a kernel runs."""
