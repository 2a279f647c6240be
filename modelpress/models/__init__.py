from .arch import Arch, SubBlock, discover
from .loading import ALIASES, load_model

__all__ = ["ALIASES", "Arch", "SubBlock", "discover", "load_model"]
