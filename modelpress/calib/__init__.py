from .runner import BlockStep, LayerwiseRunner, capture_block_inputs
from .stats import LinearStats, StatsCollector

__all__ = ["BlockStep", "LayerwiseRunner", "LinearStats", "StatsCollector", "capture_block_inputs"]
