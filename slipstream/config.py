"""Process-wide settings of slipstream, read at call time (``torch.compile`` guards on them).

Example:
    >>> import slipstream.config
    >>> slipstream.config.compiled_layer_norm
    'inductor'
"""

#: What ``torch.compile`` traces for :func:`slipstream.ops.layer_norm` (FusedLayerNorm, and
#: LPLayerNorm on CUDA). ``"inductor"`` (default): the same math as plain PyTorch ops (fp32
#: statistics, input and output in their own dtypes), which Inductor fuses with the neighbouring
#: ops. ``"kernel"``: slipstream's ``triton_op`` s, whose Triton kernels Inductor launches as they
#: are (the eager kernels' exact bits). In whole models on the H200 machine, whose steps are
#: host-bound, "inductor" launched fewer kernels and took less host time: GPT-2 small all methods +
#: compile 21.1 against 25.3 ms a step (profiled host time 45.6 against 57.1 ms), BERT-base 30.1
#: against 28.4 ms (inside the spread; profiled host time 42.5 against 47.5 ms); see
#: docs/benchmarks.md, H200 session 3. A 12-block stack alone had favoured "kernel" (17.5 against 19.1 ms).
compiled_layer_norm = "inductor"

#: What ``torch.compile`` traces for :func:`slipstream.ops.group_norm` (FusedGroupNorm, and
#: LPGroupNorm on CUDA). ``"inductor"`` (default): ``F.group_norm`` in fp32 with the output cast to
#: its own dtype (the input's layout), which Inductor lowers with its own GroupNorm decomposition and
#: fuses with its neighbours. ``"kernel"``: slipstream's custom ops,
#: which run our Triton kernels through the dispatcher and our Python launcher on every call. In
#: resnet50_gn on the H200 machine the custom ops' host time made all methods + compile slower than
#: compile alone (107 against 26 ms a step, with graph breaks since fixed; docs/benchmarks.md, H200
#: session 3), and Inductor's own GroupNorm made compile 1.9x faster than eager there. With "inductor",
#: resnet50_gn all methods + compile ran 1.20x of compile alone, 1.30x with CUDA graphs (H100, session 15).
compiled_group_norm = "inductor"

#: What ``torch.compile`` traces for :func:`slipstream.ops.seeded_dropout` (SeededDropout) and
#: :func:`slipstream.ops.seeded_dropout_rows`. ``"inductor"`` (default): the mask as a counter hash of
#: (seed, element) in PyTorch ops, which Inductor fuses into its kernels and recomputes in backward,
#: saving only the seed (:mod:`slipstream.ops.hashed_dropout`); same drop probability and scale as
#: eager mode, another random stream, so compiled masks differ from eager ones. ``"kernel"``:
#: slipstream's ``triton_op`` s, whose Philox kernel Inductor launches as it is, so a seed gives the
#: masks it gives in eager mode, bit for bit; each call is a kernel of its own forward and backward,
#: and Inductor's fused kernels split around it. GPT-2 small + compile on the H100: ``"inductor"`` was
#: faster than ``"kernel"`` in three of three runs with the same peak memory, and within noise of
#: compile alone (docs/benchmarks.md, H100 sessions 11 and 12).
compiled_dropout = "inductor"

#: How eager mode launches slipstream's Triton kernels. ``"cached"`` (default): through
#: :class:`slipstream.ops.kernels.cached_launch.CachedLauncher`, which lets Triton bind and
#: specialize the arguments once per argument signature and then calls the compiled kernel's
#: launcher directly. ``"triton"``: ``kernel[grid](...)`` on every call, as Triton documents it
#: (for comparison, or if a Triton release changes what the cached path relies on).
eager_launch = "cached"
