"""modelpress: compress neural networks to a budget."""
from .api import Compressed, compress, evaluate_domains, evaluate_model, info, load_compressed
from .data import DataConfig, get_windows, suite_windows
from .errors import ModelpressError
from .eval import evaluate, kl_divergence, perplexity
from .models import load_model
from .search import SearchConfig, search

__version__ = "0.1.0"

__all__ = [
    "Compressed", "DataConfig", "ModelpressError", "compress", "evaluate", "evaluate_domains", "evaluate_model",
    "get_windows", "info", "kl_divergence", "load_compressed", "load_model", "perplexity", "SearchConfig", "search",
    "suite_windows",
]
