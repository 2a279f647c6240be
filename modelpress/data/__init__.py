from .corpora import CORPORA, get_corpus
from .defaults import DEFAULT_CALIBRATION, DEFAULT_SUITE, N_EVAL
from .suites import SUITES, EvalDomains, suite_windows
from .windows import MIXES, DataConfig, Windows, get_windows

__all__ = ["CORPORA", "DEFAULT_CALIBRATION", "DEFAULT_SUITE", "MIXES", "N_EVAL", "SUITES", "DataConfig", "EvalDomains", "Windows",
           "get_corpus", "get_windows", "suite_windows"]
