"""Allocator registry and interface. An allocator reads a Problem (costs and error estimates) and
returns one level index per unit; it never touches a model. Allocators that measure candidates
(evolutionary) receive a fitness object that does."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..registry import Registry
from .problem import Problem

ALLOCATORS: Registry = Registry("allocator")


class Fitness:
    """How a measuring allocator scores candidates: `new_sample` draws the tokens one selection
    stage scores on, `__call__` scores a candidate on them (lower is better), and `validate` scores
    a plan on a fixed sample that selection never sees, so a search's progress can be checked
    against overfitting its own samples (None where the fitness keeps no such sample)."""

    def new_sample(self, n_tokens: int, rng):  # pragma: no cover
        raise NotImplementedError

    def __call__(self, choice, sample, parent=None) -> float:  # pragma: no cover
        raise NotImplementedError

    def validate(self, choice) -> float | None:
        return None

    def digest(self) -> str:
        """What the scores depend on besides the plan (the text, the reference): part of the keys
        of the files measuring allocators resume from, so none is resumed on other text."""
        return ""


@dataclasses.dataclass
class Allocation:
    """What an allocator returns from `run`: the choice and, for searches, how it got there."""

    choice: list[int]
    history: list[dict] = dataclasses.field(default_factory=list)  # one entry per generation
    resumed_at: int = 0  # generation a checkpointed search resumed at (0: it started fresh)
    selected_generation: int | None = None  # which generation's plan was returned (0 = the start)
    start: str | None = None  # which candidate plan a search started from (e.g. "dp", or a start file)


class Allocator:
    registered_name: ClassVar[str]
    # the setting that names the file a long allocator resumes from (None: it does not resume)
    resume_setting: ClassVar[str | None] = None
    # per-unit data (Problem.extra keys) the allocator reads: it applies to the databases that hold them
    needs: ClassVar[tuple[str, ...]] = ()
    needs_fitness: ClassVar[bool] = False
    takes_starts: ClassVar[bool] = False  # scores caller-given start plans (problem.extra["starts"])

    def allocate(self, problem: Problem, fitness=None) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def run(self, problem: Problem, fitness=None) -> Allocation:
        """`allocate`, with what the allocator recorded on the way (searches override `_record`)."""
        choice = self.allocate(problem, fitness)
        return Allocation(choice, **self._record())

    def _record(self) -> dict:
        return {}


def score_all(fitness, plans: list[list[int]], sample, parent=None) -> list[float]:
    """fitness(plan, sample) for every plan. Under data-parallel workers (utils.dist) rank r scores
    plans r, r + N, ... and the scores are shared (each is summed with zeros: exact), so every rank
    goes on with the same scores, hence the same plan, as one process would."""
    import torch

    from ..utils.dist import reduce_, world

    rank, size = world()
    if size == 1:
        return [fitness(p, sample, parent=parent) for p in plans]
    scores = torch.zeros(len(plans), dtype=torch.float64)
    for j in range(rank, len(plans), size):
        scores[j] = fitness(plans[j], sample, parent=parent)
    return reduce_(scores).tolist()
