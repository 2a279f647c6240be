"""Compression operators. Importing this package registers every operator."""
from . import compensate, drop  # noqa: F401
from .compensate import COMPENSATORS
from .base import OPERATORS, WeightOperator, output_error
from .packed import PackedWeight, dense_packed
from .quant import gptq, gptq_ggml, rtn  # noqa: F401
from .lowrank import svd  # noqa: F401
from .sparse import magnitude, sparsegpt, wanda  # noqa: F401

__all__ = ["COMPENSATORS", "OPERATORS", "PackedWeight", "WeightOperator", "dense_packed", "output_error"]
