"""Process-wide settings of slipstream, read at call time (``torch.compile`` guards on them).

Example:
    >>> import slipstream.config
    >>> slipstream.config.compiled_layer_norm
    'inductor'
"""

#: What ``torch.compile`` traces for :func:`slipstream.ops.layer_norm` (FusedLayerNorm, and
#: LPLayerNorm on CUDA). ``"inductor"``: the same math as plain PyTorch ops (fp32 statistics, input
#: and output in their own dtypes), which Inductor fuses with the neighbouring ops (a residual add
#: before, a cast after). ``"kernel"``: slipstream's ``triton_op`` s, whose Triton kernels Inductor
#: launches as they are. docs/benchmarks.md (compile overhead) has what each measured.
compiled_layer_norm = "inductor"
