"""Drop-in modules that slipstream's surgery swaps into models."""

from slipstream.nn.dropout import SeededDropout
from slipstream.nn.group_norm import FusedGroupNorm, LPGroupNorm, fuse_silu_into_group_norms
from slipstream.nn.gyro_dropout import GyroDropout
from slipstream.nn.layer_norm import FusedLayerNorm, FusedLayerNorm2d, LPLayerNorm
from slipstream.nn.run_state import load_run_state, save_run_state
from slipstream.nn.sparse_jl import SparseJL

__all__ = ["FusedLayerNorm", "FusedLayerNorm2d", "LPLayerNorm", "LPGroupNorm", "GyroDropout", "SeededDropout",
           "FusedGroupNorm", "fuse_silu_into_group_norms", "SparseJL", "save_run_state", "load_run_state"]
