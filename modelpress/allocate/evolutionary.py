"""EvoPress: (1 + λ) evolutionary search over per-unit levels under an exact budget.

One parent. Each offspring applies k = min(U{1,3}, U{1,3}) level switches: one unit goes up one
level and a partner goes down by exactly the same cost, so every candidate keeps the parent's
total cost. Duplicates are rejected. Selection runs in stages: all offspring are scored on a fresh
small token sample, the best few are rescored on more tokens, ...; the parent competes only in the
last stage. Since every generation's fitness is on a fresh sample, it wanders; where the fitness
keeps validation windows, each generation's parent is also scored on them (the same windows every
time, never used to pick offspring), which is the curve to read; with `select="validation"` the
plan returned is the one of those parents (the start included) with the lowest validation KL, so a
search that overfits its fitness windows hands back its last plan that still generalized. Fitness
is measured on the whole model (KL to the dense model) by a fitness object;
this allocator never touches a model. A checkpoint after every generation makes an interrupted
search resume exactly where it stopped (same seed ⇒ same plan, interrupted or not).
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
from .problem import Problem, fill, fit

log = logging.getLogger(__name__)

INITS = ("uniform", "dp", "best", "sensitivity")
SELECTS = ("validation", "last")


def sensitivity_cache(checkpoint: str | Path) -> Path:
    """Where a search checkpointing to `checkpoint` keeps the measurements of its sensitivity start."""
    ck = Path(checkpoint)
    return ck.with_name(f"{ck.stem}.sensitivity.json")


def mutate(p: Problem, parent: list[int], rng: np.random.Generator, max_tries: int = 50) -> list[int] | None:
    """k budget-preserving level switches (None when no switch is possible).

    Each switch moves a random unit one level up (cost +d) and a partner down. When some partner
    can go down by exactly d (equal-cost partners: same-shape layers, equal sparsity steps, one
    sub-block for another) one of those is taken, so the total cost is unchanged. Otherwise, as for
    byte costs of mixed levels, the partner whose decrease is closest to d while the plan stays
    within budget is taken (it compensates); the search ends with a fill, so the final plan is
    still less than one level step below the budget.
    """
    k = int(min(rng.integers(1, 4), rng.integers(1, 4)))
    child = list(parent)
    slack = p.budget - p.cost(child)
    done = 0
    for _ in range(max_tries):
        if done == k:
            break
        ups = [u for u, i in enumerate(child) if i + 1 < p.n_levels(u)]
        if not ups:
            break
        u = int(ups[rng.integers(len(ups))])
        d = p.costs[u][child[u] + 1] - p.costs[u][child[u]]
        exact, close = [], []
        for w, i in enumerate(child):
            if w == u:
                continue
            for j in range(i):
                e = p.costs[w][i] - p.costs[w][j]
                if e == d:
                    exact.append((w, j))
                elif e >= d - slack:
                    close.append((abs(e - d), w, j))
        if exact:
            w, j = exact[rng.integers(len(exact))]
        elif close:
            gap = min(c[0] for c in close)
            best = [(w, j) for g, w, j in close if g == gap]
            w, j = best[rng.integers(len(best))]
        else:
            continue
        slack += (p.costs[w][child[w]] - p.costs[w][j]) - d
        child[u] += 1
        child[w] = j
        done += 1
    return child if done else None


@ALLOCATORS.register("evolutionary")
@dataclasses.dataclass
class Evolutionary(Allocator):
    generations: int = 40
    offspring: int = 16
    survivors: tuple[int, ...] = (2, 1)  # kept after each selection stage; the last must be 1
    tokens: tuple[int, ...] = (512, 4096)  # fresh calibration tokens scored in each stage
    seed: int = 0
    # "uniform", "dp", or "best": the best on the last stage's sample of uniform, dp and every other
    # model-free allocator the database supports (owl for sparsity, block-influence for depth) and
    # of the caller's start plans (search.allocate's `starts`);
    # "sensitivity": the same, with the `sensitivity` allocator's plan (measured one-at-a-time
    # fitness changes + knapsack) among the candidates — one evaluation per (unit, other level)
    init: str = "best"
    sensitivity_tokens: int = 2048  # init="sensitivity": tokens of its one measurement sample
    checkpoint: str | None = None  # JSON written every generation; an existing one is resumed
    # "validation": return the parent (start included) with the lowest validation KL; "last": the
    # last parent. Without validation windows both return the last parent.
    select: str = "validation"

    needs_fitness = True
    takes_starts = True
    resume_setting = "checkpoint"

    def __post_init__(self) -> None:
        self.survivors = tuple(self.survivors)
        self.tokens = tuple(self.tokens)
        if len(self.survivors) != len(self.tokens) or not self.tokens:
            raise ConfigError("survivors and tokens need one entry per selection stage")
        if self.survivors[-1] != 1 or any(s < 1 for s in self.survivors):
            raise ConfigError("the last stage keeps exactly one survivor")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}")
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {', '.join(SELECTS)}, got {self.select!r}")
        if self.generations < 0 or self.offspring < 1:
            raise ConfigError("generations >= 0 and offspring >= 1")
        self.history: list[dict] = []
        self.start_validation: float | None = None  # validation KL of the starting plan
        self.start_plan: list[int] | None = None
        self.start_name: str | None = None  # which candidate the search started from
        self.selected_generation: int | None = None  # which parent was returned (0 = the start)

    def _key(self, p: Problem, fitness) -> str:
        """What a checkpoint must match to be resumed: the problem, the settings and the fitness's
        text. The number of generations is not part of it, so a finished search can be extended."""
        cfg = dataclasses.asdict(self) | {"checkpoint": None, "generations": None}
        cfg.pop("select")  # which parent is returned does not change the search
        starts = sorted(p.extra.get("starts", {}).values())  # the plans, not their names (paths as typed)
        h = hashlib.sha256(json.dumps([p.units, p.costs, p.budget, cfg] + ([starts] if starts else []),
                                      default=str).encode())
        h.update(fitness.digest().encode())
        return h.hexdigest()[:16]

    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        if fitness is None:
            raise ConfigError("the evolutionary allocator needs a fitness (it measures the whole model)")
        from .dp import DP
        from .uniform import Uniform

        rng = np.random.default_rng(self.seed)
        key = self._key(problem, fitness)
        start = self.resumed_at = 0
        parent: list[int] | None = None
        best_fit = None
        ck = Path(self.checkpoint) if self.checkpoint else None
        # data-parallel workers (utils.dist): rank 0 reads (and moves aside) the checkpoint, all resume from it
        state = from_main(lambda: self._resumable(ck, key))
        if state:
            start, parent, best_fit = state["generation"], state["parent"], state["fitness"]
            self.resumed_at = start
            self.history = state["history"]
            self.start_validation = state.get("start_validation")
            self.start_plan = state.get("start_plan")
            self.start_name = state.get("start_name")
            if start > self.generations:  # a longer search of this problem: its plan at that point
                kept = self.history[self.generations - 1].get("parent") if self.generations else None
                if kept is None:
                    raise ConfigError(f"checkpoint {ck} ran {start} generations and does not keep the plan "
                                      f"after {self.generations}; ask for >= {start} or use another checkpoint")
                log.info("checkpoint ran %d generations; taking its plan after %d", start, self.generations)
                self.history = self.history[:self.generations]
                return fill(problem, self._selected(kept))
            rng.bit_generator.state = state["rng"]
            log.info("resuming evolutionary search at generation %d", start)
        if parent is None:
            if problem.extra.get("starts") and self.init in ("uniform", "dp"):
                raise ConfigError(f"start plans are scored with init 'best' or 'sensitivity', not {self.init!r}")
            self.history = []
            self.start_name = self.init
            if self.init == "uniform":
                parent = Uniform().allocate(problem)
            elif self.init == "dp":
                parent = DP().allocate(problem)
            else:
                parent = self._best_start(problem, fitness, rng, measured=self.init == "sensitivity",
                                          cache=sensitivity_cache(ck) if ck else None)
            self.start_plan = list(parent)
            self.start_validation = fitness.validate(parent)
            self._save(ck, key, 0, parent, None, rng)

        with Bar(total=self.generations, desc="evolutionary search", initial=start) as bar:
            for gen in range(start, self.generations):
                seen = {tuple(parent)}
                kids: list[list[int]] = []
                tries = 0
                while len(kids) < self.offspring and tries < 20 * self.offspring:
                    tries += 1
                    kid = mutate(problem, parent, rng)
                    if kid is not None and tuple(kid) not in seen:
                        seen.add(tuple(kid))
                        kids.append(kid)
                if not kids:
                    log.info("no budget-preserving mutation exists; stopping")
                    break
                cands = kids
                scores: list[float] = []
                for stage, (n_tok, keep) in enumerate(zip(self.tokens, self.survivors)):
                    sample = fitness.new_sample(n_tok, rng)
                    last = stage == len(self.tokens) - 1
                    if last:
                        cands = cands + [parent]
                    scores = score_all(fitness, cands, sample, parent=parent)
                    order = sorted(range(len(cands)), key=lambda j: (scores[j], j == len(cands) - 1 and last))
                    cands = [cands[j] for j in order[:keep]]
                    scores = [scores[j] for j in order[:keep]]
                improved = cands[0] != parent
                parent, best_fit = cands[0], scores[0]
                self.history.append({"generation": gen + 1, "fitness": best_fit, "improved": improved,
                                     "validation": fitness.validate(parent), "parent": list(parent)})
                self._save(ck, key, gen + 1, parent, best_fit, rng)
                bar.update(1)
                val = self.history[-1]["validation"]
                bar.set_postfix(kl=f"{best_fit:.5f}", **({"val": f"{val:.5f}"} if val is not None else {}))
                log.info("generation %d: fitness %.6f%s%s", gen + 1, best_fit,
                         f", validation {val:.6f}" if val is not None else "", " (new parent)" if improved else "")
        return fill(problem, self._selected(parent))  # fill: no-op with equal-cost partners; uses slack left by compensating ones

    @staticmethod
    def _resumable(ck: Path | None, key: str) -> dict | None:
        """The checkpoint's state if it belongs to this problem; one of another problem is moved
        aside (it holds that search's work), an unreadable one ignored."""
        if ck is None or not ck.is_file():
            return None
        try:
            state = read_json(ck, "search checkpoint", "starting over")
        except CorruptFileError as e:
            Evolutionary._set_aside(ck, "damaged", str(e))
            return None
        if state and state.get("key") == key:
            return state
        if state:
            Evolutionary._set_aside(ck, state.get("key", "old"),
                                    f"search checkpoint {ck} belongs to another problem; starting over")
        return None

    @staticmethod
    def _set_aside(ck: Path, tag: str, why: str) -> None:
        """Keep a checkpoint this search will not resume as CK.<tag>.json (it holds other work),
        saying why; where the folder cannot be changed, only say why."""
        aside = ck.with_name(f"{ck.stem}.{tag}{ck.suffix}")
        try:
            ck.replace(aside)
        except OSError:
            log.warning("%s", why)
            return
        log.warning("%s (kept as %s)", why, aside)

    def _record(self) -> dict:
        return {"history": list(self.history), "resumed_at": self.resumed_at,
                "selected_generation": self.selected_generation, "start": self.start_name}

    def _selected(self, last: list[int]) -> list[int]:
        """The plan to return: `last`, or with select="validation" the parent with the lowest
        validation KL (ties go to the later one; the start counts as generation 0)."""
        self.selected_generation = len(self.history)
        if self.select == "last" or self.start_validation is None or self.start_plan is None:
            return last
        seen = [(0, self.start_validation, self.start_plan)] + [
            (h["generation"], h["validation"], h["parent"]) for h in self.history
            if h.get("validation") is not None and h.get("parent") is not None]
        gen, val, plan = min(seen, key=lambda t: (t[1], -t[0]))
        if gen != len(self.history):
            log.info("returning generation %d's plan (validation KL %.6f; last parent %.6f)", gen, val,
                     self.history[-1]["validation"] if self.history else float("nan"))
        self.selected_generation = gen
        return list(plan)

    def _best_start(self, problem: Problem, fitness, rng, measured: bool = False, cache: Path | None = None) -> list[int]:
        """The model-free allocators' plans, the caller's start plans (`problem.extra["starts"]`,
        name -> choice, brought within the budget by `fit`) and with `measured` the sensitivity
        allocator's, scored on one sample; the best one starts the search. An allocator the database does not support
        (it raises ConfigError) is skipped."""
        from .sensitivity import Sensitivity

        plans: dict[str, list[int]] = {}
        for name in ["uniform", "dp"] + [n for n in ALLOCATORS.names() if n not in ("uniform", "dp")]:
            cls = ALLOCATORS.get(name)
            if cls.needs_fitness:
                continue
            try:
                plan = cls().allocate(problem)
            except ConfigError:
                continue
            if plan not in plans.values():
                plans[name] = plan
        for name, plan in problem.extra.get("starts", {}).items():  # the caller's (e.g. a llama.cpp preset's types)
            plan = fit(problem, plan)
            if plan not in plans.values():
                plans[name] = plan
        if measured:
            plan = Sensitivity(tokens=self.sensitivity_tokens, seed=self.seed,
                               cache=str(cache) if cache else None).allocate(problem, fitness)
            if plan not in plans.values():
                plans["sensitivity"] = plan
        if len(plans) == 1:
            self.start_name = next(iter(plans))
            return plans[self.start_name]
        sample = fitness.new_sample(self.tokens[-1], rng)
        scores = dict(zip(plans, score_all(fitness, list(plans.values()), sample)))
        best = self.start_name = min(scores, key=scores.get)
        log.info("init: %s -> %s", ", ".join(f"{n} {f:.5f}" for n, f in scores.items()), best)
        return plans[best]

    def _save(self, ck: Path | None, key: str, gen: int, parent, fit, rng) -> None:
        if ck is None or not is_main():  # data-parallel workers hold the same state; rank 0 writes it
            return
        write_json(ck, {"key": key, "generation": gen, "parent": parent, "fitness": fit,
                        "rng": rng.bit_generator.state, "history": self.history,
                        "start_validation": self.start_validation, "start_plan": self.start_plan,
                        "start_name": self.start_name}, checksum=True)
