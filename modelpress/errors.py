"""Exceptions. Every error a user can cause is a ModelpressError with a message that says what to do."""


class ModelpressError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelLoadError(ModelpressError):
    """The model could not be found, fetched or understood."""


class UnsupportedArchitectureError(ModelpressError):
    """The model is not a decoder-only causal LM modelpress can walk block by block."""


class DataError(ModelpressError):
    """A corpus could not be found or is too small for the requested windows."""


class BudgetError(ModelpressError):
    """A budget or compression setting is out of range or cannot be met."""


class CheckpointError(ModelpressError):
    """A compressed checkpoint is missing, truncated, corrupt or of an unknown version."""


class ConfigError(ModelpressError):
    """An operator, allocator or method name or setting is unknown or invalid."""
