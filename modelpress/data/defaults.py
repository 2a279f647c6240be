"""Data defaults, in a module with no imports so the CLI can name them without loading torch.

DEFAULT_CALIBRATION is the calibration source of every verb unless told otherwise, chosen by the
worst-domain figures of bench/calibration.py (docs/benchmarks.md); DEFAULT_SUITE the evaluation
domains every report shows; N_EVAL the held-out windows per domain.
"""

DEFAULT_CALIBRATION = "mix+self"
DEFAULT_SUITE = "default"
N_EVAL = 16
