"""Plain tensor ops backed by Triton kernels, with pure-PyTorch fallbacks."""

from slipstream.ops._backend import pytorch_fallback
from slipstream.ops.dropout import seeded_dropout, seeded_dropout_rows
from slipstream.ops.group_norm import group_norm
from slipstream.ops.layer_norm import layer_norm
from slipstream.ops.sparse_jl import sparse_jl, sparse_jl_matrix, sparse_jl_reference, sparse_jl_transpose

__all__: list[str] = ["layer_norm", "seeded_dropout", "seeded_dropout_rows", "group_norm",
                       "sparse_jl", "sparse_jl_transpose", "sparse_jl_matrix", "sparse_jl_reference",
                       "pytorch_fallback"]
