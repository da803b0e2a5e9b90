"""Process-wide settings of slipstream, read at call time (``torch.compile`` guards on them).

Example:
    >>> import slipstream.config
    >>> slipstream.config.compiled_layer_norm
    'kernel'
"""

#: What ``torch.compile`` traces for :func:`slipstream.ops.layer_norm` (FusedLayerNorm, and
#: LPLayerNorm on CUDA). ``"kernel"`` (default): slipstream's ``triton_op`` s, whose Triton kernels
#: Inductor launches as they are. ``"inductor"``: the same math as plain PyTorch ops (fp32
#: statistics, input and output in their own dtypes), which Inductor may fuse with the neighbouring
#: ops. On the H200 machine (host-bound steps) "kernel" measured faster, 17.5 against 19.1 ms for a
#: 12-block stack (docs/benchmarks.md, compile overhead), so it is the default.
compiled_layer_norm = "kernel"

#: How eager mode launches slipstream's Triton kernels. ``"cached"`` (default): through
#: :class:`slipstream.ops.kernels.cached_launch.CachedLauncher`, which lets Triton bind and
#: specialize the arguments once per argument signature and then calls the compiled kernel's
#: launcher directly. ``"triton"``: ``kernel[grid](...)`` on every call, as Triton documents it
#: (for comparison, or if a Triton release changes what the cached path relies on).
eager_launch = "cached"
