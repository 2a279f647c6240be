"""Kinds of levels, one file each: what a unit is, which levels it has, how a level is made and what
it costs. A new kind = one file here (a registered `Kind` subclass), one import line below, one
test row.

- quant:    GPTQ at several bit-widths
- sparsity: SparseGPT pruning in equal absolute steps
- depth:    attention / MLP sub-blocks dropped or kept
- joint:    GPTQ bits x SparseGPT sparsity x EoRA rank, in bytes
- lowrank:  ranks of an activation-aware SVD, in bytes
- gguf:     llama.cpp tensor types
"""
from .base import KINDS, Kind, UnitInfo, kind_for_budget, pareto
from .depth import DepthKind
from .gguf import GGUFKind
from .joint import JointKind
from .lowrank import LowRankKind
from .quant import QuantKind
from .sparsity import SparsityKind

__all__ = ["KINDS", "DepthKind", "GGUFKind", "JointKind", "Kind", "LowRankKind", "QuantKind", "SparsityKind",
           "UnitInfo", "kind_for_budget", "pareto"]
