"""Allocator registry and interface. An allocator reads a Problem (costs and error estimates) and
returns one level index per unit; it never touches a model. Allocators that measure candidates
(evolutionary) receive a fitness object that does."""
from __future__ import annotations

from typing import ClassVar

from ..registry import Registry
from .problem import Problem

ALLOCATORS: Registry = Registry("allocator")


class Allocator:
    registered_name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("quant", "sparsity", "depth", "gguf", "joint", "lowrank", "kv")
    needs_fitness: ClassVar[bool] = False

    def allocate(self, problem: Problem, fitness=None) -> list[int]:  # pragma: no cover
        raise NotImplementedError
