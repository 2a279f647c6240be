"""Allocators: pick one level per unit under a budget. Importing registers them all."""
from . import dp, evolutionary, influence, owl, sensitivity, uniform  # noqa: F401
from .base import ALLOCATORS, Allocation, Allocator
from .problem import Problem, fill, fit, trim

__all__ = ["ALLOCATORS", "Allocation", "Allocator", "Problem", "fill", "fit", "trim"]
