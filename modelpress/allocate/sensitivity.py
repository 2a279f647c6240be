"""Measured sensitivities + knapsack: dp on whole-model errors measured one unit at a time.

`dp` sums per-layer errors e = ‖(W−Ŵ)X‖² / ‖WX‖², which say how far a layer's output moves, not how
much the model's predictions care. This allocator measures that: starting from the uniform plan
it moves one unit at a time to a neighbouring level and records the change in the fitness (KL to
the dense model, all on one token sample, so every difference is paired), then solves the
knapsack over the measured changes. Levels within `reach` of the uniform level are measured;
a level farther away is extrapolated from the nearest measured one on its side, as that level's
sensitivity (fitness change per unit of layer error) times its own layer error change — to first
order the KL grows linearly in e. `reach=None` measures every level.

It still assumes the changes add up — the evolutionary search does not — which makes its plan a
good start for that search (`evolutionary`, init="sensitivity") and a stronger baseline than
`dp`. Cost: one evaluation per measured (unit, level), each running the model from the unit's
block on; with `cache` the measurements are kept as they come, so an interrupted pass resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..utils.dist import from_main, is_main
from ..utils.io import CorruptFileError, read_json, write_json
from ..utils.progress import Bar
from .base import ALLOCATORS, Allocator, score_all
from .dp import DP
from .problem import Problem
from .uniform import Uniform

log = logging.getLogger(__name__)


@ALLOCATORS.register("sensitivity")
@dataclasses.dataclass
class Sensitivity(Allocator):
    tokens: int = 2048  # calibration tokens of the one sample every measurement uses
    reach: int | None = 1  # levels measured on each side of the uniform level (None: all)
    seed: int = 0
    cache: str | None = None  # JSON of the measurements, written as they come; an existing one is resumed

    needs_fitness = True
    resume_setting = "cache"

    def __post_init__(self) -> None:
        if self.tokens < 1 or (self.reach is not None and self.reach < 1):
            raise ConfigError("sensitivity needs tokens >= 1 and reach >= 1 (or None for every level)")

    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        return DP().allocate(self.measure(problem, fitness))

    def measure(self, problem: Problem, fitness=None) -> Problem:
        """`problem` with its errors replaced by the fitness change of each (unit, level) relative
        to the uniform plan (0 at the unit's uniform level), measured or extrapolated."""
        if fitness is None:
            raise ConfigError("the sensitivity allocator needs a fitness (it measures the whole model)")
        base = Uniform().allocate(problem)
        todo = [(u, i) for u in range(len(problem.units)) for i in range(problem.n_levels(u))
                if i != base[u] and (self.reach is None or abs(i - base[u]) <= self.reach)]
        sample = fitness.new_sample(self.tokens, np.random.default_rng(self.seed))
        key = hashlib.sha256(json.dumps([problem.units, problem.costs, problem.budget, self.tokens, self.seed, sample,
                                         fitness.digest()], default=str).encode()).hexdigest()[:16]
        path = Path(self.cache) if self.cache else None
        done: dict[str, float] = from_main(lambda: _cached(path, key))  # data-parallel workers: rank 0 reads it
        f0 = fitness(base, sample, parent=base)
        left = [(u, i) for u, i in todo if f"{u}:{i}" not in done]
        if done:
            log.info("sensitivity: %d of %d measurements read from %s", len(todo) - len(left), len(todo), path)
        with Bar(total=len(todo), desc="sensitivities", initial=len(todo) - len(left)) as bar:
            for s in range(0, len(left), 20):  # in chunks: workers score a chunk side by side, then it is saved
                chunk = left[s:s + 20]
                children = [[i if j == u else b for j, b in enumerate(base)] for u, i in chunk]
                for (u, i), f in zip(chunk, score_all(fitness, children, sample, parent=base)):
                    done[f"{u}:{i}"] = f - f0
                bar.update(len(chunk))
                if path is not None and is_main():
                    write_json(path, {"key": key, "fitness": f0, "delta": done}, checksum=True)
        log.info("sensitivities: %d measured on one sample of %d tokens (uniform plan fitness %.5f)",
                 len(todo), self.tokens, f0)
        errors = []
        for u in range(len(problem.units)):
            e = problem.errors[u]
            row = []
            for i in range(problem.n_levels(u)):
                if i == base[u]:
                    row.append(0.0)
                    continue
                if f"{u}:{i}" in done:
                    row.append(done[f"{u}:{i}"])
                    continue
                j = base[u] + (self.reach if i > base[u] else -self.reach)  # nearest measured level
                dj, de = done[f"{u}:{j}"], e[j] - e[base[u]]
                row.append(dj * (e[i] - e[base[u]]) / de if de else dj)
            errors.append(row)
        return dataclasses.replace(problem, errors=errors)


def _cached(path: Path | None, key: str) -> dict[str, float]:
    """The measurements kept in `path` for this problem (`key`), or none."""
    if path is None or not path.is_file():
        return {}
    try:
        saved = read_json(path, "sensitivity cache", "measuring again")
    except CorruptFileError as e:
        log.warning("%s", e)
        return {}
    delta = saved.get("delta")
    return delta if saved.get("key") == key and isinstance(delta, dict) else {}
