from .corpora import CORPORA, get_corpus
from .windows import DataConfig, Windows, get_windows

__all__ = ["CORPORA", "DataConfig", "Windows", "get_corpus", "get_windows"]
