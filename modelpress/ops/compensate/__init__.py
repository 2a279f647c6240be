from . import eora  # noqa: F401
from .base import COMPENSATORS, Compensator

__all__ = ["COMPENSATORS", "Compensator"]
