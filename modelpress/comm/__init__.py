"""Gradient compression for data-parallel training (torch.distributed)."""
from .compressors import COMPRESSORS, Compressor
from .ef import ERROR_FEEDBACK, ErrorFeedback
from .exchange import exchange
from .hooks import CommState, compression_hook
from .lgreco import LGreCo
from .onebit_adam import OneBitAdam

__all__ = ["COMPRESSORS", "CommState", "Compressor", "ERROR_FEEDBACK", "ErrorFeedback", "LGreCo", "OneBitAdam",
           "compression_hook", "exchange"]
