from . import fp16, noop, powersgd, qsgd, randk, sign, topk  # noqa: F401
from .base import COMPRESSORS, Compressor

__all__ = ["COMPRESSORS", "Compressor"]
