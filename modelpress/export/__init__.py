from .checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from .hf import export_hf

__all__ = ["checkpoint_info", "export_hf", "load_checkpoint", "save_checkpoint"]
