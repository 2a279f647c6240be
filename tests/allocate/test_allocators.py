import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.allocate import ALLOCATORS, Problem
from modelpress.allocate.base import Fitness
from modelpress.allocate.problem import fit
from modelpress.errors import BudgetError, ConfigError


class SumFitness(Fitness):
    """Fitness = sum of the problem's errors, plus a small sample-dependent wobble."""

    def __init__(self, p: Problem):
        self.p = p
        self.calls = 0

    def new_sample(self, n_tokens, rng):
        return float(rng.random())

    def __call__(self, choice, sample, parent=None):
        self.calls += 1
        return self.p.error(choice) * (1 + 0.01 * sample)


@st.composite
def problems(draw, kind="any"):
    n = draw(st.integers(1, 10))
    costs, errors, labels = [], [], []
    for _ in range(n):
        if kind == "depth":
            c = [0, 1]
        else:
            k = draw(st.integers(1, 5))
            c0 = draw(st.integers(0, 30))
            steps = draw(st.lists(st.integers(1, 12), min_size=k - 1, max_size=k - 1))
            c = [c0]
            for s in steps:
                c.append(c[-1] + s)
        e = sorted(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(c), max_size=len(c))), reverse=True)
        costs.append(c)
        errors.append(e)
        labels.append([1 - (i + 1) / (len(c) + 1) for i in range(len(c))])
    lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    budget = draw(st.integers(lo, hi + 15))
    extra = {"outlier_ratio": draw(st.lists(st.floats(0, 0.2), min_size=n, max_size=n)),
             "block": [i // 2 for i in range(n)], "numel": [max(c[-1], 1) for c in costs],
             "influence": draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))}
    return Problem([f"u{i}" for i in range(n)], costs, errors, budget, labels=labels,
                   groups=[f"g{i % 3}" for i in range(n)], extra=extra)


def _alloc(name, p, **kw):
    a = ALLOCATORS.build(name, **kw)
    fitness = SumFitness(p) if a.needs_fitness else None
    return a.allocate(p, fitness)


@pytest.mark.parametrize("name,kw", [("uniform", {}), ("dp", {}), ("owl", {}), ("sensitivity", {}),
                                     ("evolutionary", dict(generations=3, offspring=4, tokens=(1, 2), survivors=(2, 1)))])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_budget_exactness(name, kw, p):
    choice = _alloc(name, p, **kw)
    assert len(choice) == len(p.units)
    assert all(0 <= i < p.n_levels(u) for u, i in enumerate(choice))
    assert p.cost(choice) <= p.budget
    assert p.slack_ok(choice), (p.budget - p.cost(choice), choice)


@settings(max_examples=60, deadline=None)
@given(p=problems(kind="depth"))
def test_budget_exactness_depth(p):
    for name in ("block-influence", "dp", "uniform"):
        choice = _alloc(name, p)
        assert p.cost(choice) <= p.budget and p.slack_ok(choice)


def test_infeasible_budget_is_a_clear_error():
    with pytest.raises(BudgetError, match="below the cheapest plan"):
        Problem(["a"], [[5, 6]], [[1, 0]], budget=3)


def test_dp_is_optimal_for_additive_errors():
    rng = np.random.default_rng(0)
    costs = [[1, 2, 3, 4]] * 6
    errors = [sorted(rng.random(4) * (u + 1), reverse=True) for u in range(6)]
    p = Problem([f"u{i}" for i in range(6)], costs, [list(e) for e in errors], budget=14)
    best = min((c for c in np.ndindex(*(4,) * 6) if p.cost(c) <= 14), key=p.error)
    assert p.error(_alloc("dp", p)) == pytest.approx(p.error(best))


class Interrupt(Exception):
    pass


class TableFitness(Fitness):
    """An additive whole-model objective the problem's error estimates get wrong."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def new_sample(self, n_tokens, rng):
        return None

    def __call__(self, choice, sample, parent=None):
        self.calls += 1
        return float(sum(self.table[u][i] for u, i in enumerate(choice)))


def sensitive_problem():
    """Six units whose layer errors are alike, but whose effect on the model is not: the whole-model
    objective is s_u x e_u(level) with sensitivities s spanning 100x (additive, linear in e)."""
    rng = np.random.default_rng(0)
    costs = [[1, 2, 3, 4, 5]] * 6
    errors = [sorted(rng.random(5), reverse=True) for _ in range(6)]
    sens = [0.1, 10.0, 0.3, 3.0, 1.0, 0.2]
    p = Problem([f"u{i}" for i in range(6)], costs, [list(e) for e in errors], budget=17)
    return p, [[s * e for e in es] for s, es in zip(sens, errors)]


def test_sensitivity_measures_what_dp_only_estimates(tmp_path):
    """dp on the layer errors misses the optimum; the measured sensitivities find it, measuring
    every level (reach=None: one evaluation per (unit, other level) plus the uniform plan's) or only
    the neighbours of the uniform level and extrapolating the rest from the layer errors (reach=1)."""
    p, true = sensitive_problem()
    f = TableFitness(true)
    best = min((c for c in np.ndindex(*(5,) * 6) if p.cost(c) <= p.budget), key=lambda c: f(c, None))
    assert f(_alloc("dp", p), None) > 1.2 * f(best, None)
    f.calls = 0
    every = ALLOCATORS.build("sensitivity", reach=None).allocate(p, f)
    assert f.calls == 1 + 6 * 4
    f.calls = 0
    near = ALLOCATORS.build("sensitivity").allocate(p, f)
    assert f.calls <= 1 + 6 * 2  # at most two neighbours per unit
    assert f(every, None) == pytest.approx(f(best, None)) and f(near, None) == pytest.approx(f(best, None))
    evo = ALLOCATORS.build("evolutionary", generations=0, offspring=2, tokens=(1,), survivors=(1,), init="sensitivity")
    assert evo.allocate(p, TableFitness(true)) == near  # the measured plan starts the search
    with pytest.raises(ConfigError, match="needs a fitness"):
        ALLOCATORS.build("sensitivity").allocate(p)


def test_sensitivity_pass_resumes_from_its_cache(tmp_path):
    p, true = sensitive_problem()
    cache = tmp_path / "sens.json"

    class Dying(TableFitness):
        def __call__(self, *a, **k):
            if self.calls == 22:
                raise Interrupt
            return super().__call__(*a, **k)

    with pytest.raises(Interrupt):
        ALLOCATORS.build("sensitivity", reach=None, cache=str(cache)).allocate(p, Dying(true))
    assert len(json.loads(cache.read_text())["delta"]) == 20  # written every 20 measurements
    f = TableFitness(true)
    plan = ALLOCATORS.build("sensitivity", reach=None, cache=str(cache)).allocate(p, f)
    assert f.calls == 1 + 24 - 20  # the uniform plan, then only what was missing
    assert plan == ALLOCATORS.build("sensitivity", reach=None).allocate(p, TableFitness(true))
    f.calls = 0
    ALLOCATORS.build("sensitivity", reach=None, cache=str(cache), seed=1).allocate(p, f)
    assert f.calls == 1 + 24  # another sample: measured again


class PairFitness(Fitness):
    """A non-additive objective. Half the units are ordinary: they cost e² = 4^-level. The other
    half come in pairs whose errors cancel downstream: a pair costs 0.1·|e_a − e_b| + 0.01·(e_a + e_b),
    nearly nothing when both sit at the same level. Measured one at a time (what dp sees) every
    unit looks the same (4^-level), so dp spreads the budget evenly; the best plan drops the
    pairs to the lowest level together and spends what that frees on the ordinary units."""

    def __init__(self, p):
        self.p = p

    def new_sample(self, n_tokens, rng):
        return None

    def __call__(self, choice, sample, parent=None):
        e = [2.0 ** -i for i in choice]
        ordinary = sum(x * x for x in e[:8])
        pairs = sum(0.1 * abs(e[8 + 2 * k] - e[9 + 2 * k]) + 0.01 * (e[8 + 2 * k] + e[9 + 2 * k]) for k in range(4))
        return ordinary + pairs


def pair_problem():
    n = 16
    costs = [[2 + i for i in range(5)]] * n
    errors = [[4.0 ** -i for i in range(5)] for _ in range(n)]
    return Problem([f"u{i}" for i in range(n)], costs, errors, budget=4 * n)


def test_evolutionary_beats_dp_when_errors_interact():
    p = pair_problem()
    f = PairFitness(p)
    dp = _alloc("dp", p)
    evo = ALLOCATORS.build("evolutionary", generations=150, offspring=8, tokens=(1,), survivors=(1,), init="uniform")
    choice = evo.allocate(p, f)
    assert p.cost(choice) == p.cost(dp) == p.budget
    assert f(choice, None) < 0.5 * f(dp, None), (f(choice, None), f(dp, None))


def test_same_seed_same_plan_and_other_seed_differs():
    p = pair_problem()
    kw = dict(generations=30, offspring=6, tokens=(1, 2), survivors=(2, 1), init="uniform")
    a = ALLOCATORS.build("evolutionary", seed=7, **kw).allocate(p, PairFitness(p))
    b = ALLOCATORS.build("evolutionary", seed=7, **kw).allocate(p, PairFitness(p))
    c = ALLOCATORS.build("evolutionary", seed=8, **kw).allocate(p, PairFitness(p))
    assert a == b and a != c


def test_search_resumes_after_interruption(tmp_path):
    p = pair_problem()
    kw = dict(generations=25, offspring=6, tokens=(1, 2), survivors=(2, 1), seed=3, init="uniform")
    full = ALLOCATORS.build("evolutionary", **kw).allocate(p, SumFitness(p))

    class Dying(SumFitness):
        def __call__(self, *a, **k):
            if self.calls == 100:
                raise Interrupt
            return super().__call__(*a, **k)

    ck = tmp_path / "search.json"
    with pytest.raises(Interrupt):
        ALLOCATORS.build("evolutionary", checkpoint=str(ck), **kw).allocate(p, Dying(p))
    state = json.loads(ck.read_text())
    assert 0 < state["generation"] < 25
    resumed = ALLOCATORS.build("evolutionary", checkpoint=str(ck), **kw)
    f = SumFitness(p)
    assert resumed.allocate(p, f) == full
    assert resumed.resumed_at == state["generation"]
    assert f.calls < 25 * 8  # it did not start over
    assert len(resumed.history) == 25


class OverfitFitness(PairFitness):
    """The held-out validation says the opposite of the fitness, as when a search fits its few
    fitness windows and loses elsewhere."""

    def validate(self, choice):
        return -self(choice, None)


def test_select_validation_returns_the_parent_that_generalized():
    p = pair_problem()
    kw = dict(generations=20, offspring=6, tokens=(1, 2), survivors=(2, 1), seed=3, init="uniform")
    last = ALLOCATORS.build("evolutionary", select="last", **kw)
    evolved = last.allocate(p, OverfitFitness(p))
    chosen = ALLOCATORS.build("evolutionary", **kw)
    picked = chosen.allocate(p, OverfitFitness(p))
    uniform = ALLOCATORS.build("uniform").allocate(p)
    assert PairFitness(p)(evolved, None) < PairFitness(p)(uniform, None)  # the search did move
    assert picked == uniform and chosen.selected_generation < 20  # validation was best before the search moved
    assert last.selected_generation == 20
    plain = ALLOCATORS.build("evolutionary", **kw)  # no validation windows: the last parent
    assert plain.allocate(p, SumFitness(p)) == ALLOCATORS.build("evolutionary", select="last", **kw).allocate(
        p, SumFitness(p))
    with pytest.raises(ConfigError, match="select"):
        ALLOCATORS.build("evolutionary", select="best")


def test_evolutionary_settings_validated():
    with pytest.raises(ConfigError):
        ALLOCATORS.build("evolutionary", survivors=(2, 2), tokens=(1, 2))
    with pytest.raises(ConfigError, match="needs a fitness"):
        ALLOCATORS.build("evolutionary").allocate(pair_problem())


class DroppedInfluence(Fitness):
    """Depth fitness: the summed true influence of the dropped sub-blocks."""

    def __init__(self, infl):
        self.infl = infl

    def new_sample(self, n_tokens, rng):
        return None

    def __call__(self, choice, sample, parent=None):
        return sum(x for x, c in zip(self.infl, choice) if c == 0)


def test_evolutionary_starts_from_the_best_model_free_plan():
    """init="best" scores every model-free allocator the problem supports (here block-influence,
    whose data the depth problem carries; owl raises ConfigError and is skipped) and starts there:
    with no generations the search returns block-influence's plan, which dp (misled by errors that
    say the opposite) and uniform miss."""
    n, drop = 12, 4
    infl = [0.5, 0.1, 0.9, 0.05, 0.7, 0.2, 0.8, 0.02, 0.6, 0.3, 0.4, 0.15]
    p = Problem([f"b{i}" for i in range(n)], [[0, 1]] * n, [[1.0 - x, 0.0] for x in infl], budget=n - drop,
                extra={"influence": infl})
    f = DroppedInfluence(infl)
    bi, dp, uni = (_alloc(a, p) for a in ("block-influence", "dp", "uniform"))
    assert f(bi, None) < min(f(dp, None), f(uni, None))
    evo = ALLOCATORS.build("evolutionary", generations=0, offspring=2, tokens=(1,), survivors=(1,))
    assert evo.allocate(p, f) == bi
    only_uniform = ALLOCATORS.build("evolutionary", generations=0, offspring=2, tokens=(1,), survivors=(1,),
                                    init="uniform").allocate(p, f)
    assert f(only_uniform, None) > f(bi, None)


def test_evolutionary_starts_from_a_callers_plan_when_it_is_best():
    """A start plan the caller gives (problem.extra["starts"]) joins init="best"'s candidates; one
    over the budget is brought within it first."""
    p = pair_problem()
    f = PairFitness(p)
    evo = dict(generations=0, offspring=2, tokens=(1,), survivors=(1,))
    plain = ALLOCATORS.build("evolutionary", **evo).allocate(p, f)
    good = ALLOCATORS.build("evolutionary", generations=150, offspring=8, tokens=(1,), survivors=(1,),
                            init="uniform").allocate(p, f)
    assert f(good, None) < f(plain, None)
    p.extra["starts"] = {"given": good}
    assert ALLOCATORS.build("evolutionary", **evo).allocate(p, f) == good
    p.extra["starts"] = {"over": [4] * 16}  # all at the top level: twice the budget, trimmed, then scored
    over = ALLOCATORS.build("evolutionary", **evo)
    start = over.allocate(p, f)
    assert p.cost(start) <= p.budget and over.start_name in ("over", "uniform", "dp")
    assert start == fit(p, [4] * 16) or over.start_name != "over"
    with pytest.raises(ConfigError, match="start plans are scored with init"):
        ALLOCATORS.build("evolutionary", **evo, init="uniform").allocate(p, f)


def test_finished_search_extends_and_truncates(tmp_path):
    p = pair_problem()
    kw = dict(offspring=6, tokens=(1, 2), survivors=(2, 1), seed=5, init="uniform")
    straight = ALLOCATORS.build("evolutionary", generations=30, **kw).allocate(p, SumFitness(p))
    short = ALLOCATORS.build("evolutionary", generations=12, **kw).allocate(p, SumFitness(p))
    ck = str(tmp_path / "search.json")
    assert ALLOCATORS.build("evolutionary", generations=12, checkpoint=ck, **kw).allocate(p, SumFitness(p)) == short
    f = SumFitness(p)
    longer = ALLOCATORS.build("evolutionary", generations=30, checkpoint=ck, **kw)
    assert longer.allocate(p, f) == straight  # extended from generation 12, as if run straight through
    assert f.calls <= 18 * 9  # 18 generations x (6 offspring + 2 survivors + the parent)
    again = ALLOCATORS.build("evolutionary", generations=12, checkpoint=ck, **kw)
    f = SumFitness(p)
    assert again.allocate(p, f) == short and f.calls == 0  # read back from the longer checkpoint
    assert len(again.history) == 12
    with pytest.raises(ConfigError, match="ask for"):
        ALLOCATORS.build("evolutionary", generations=0, checkpoint=ck, **kw).allocate(p, SumFitness(p))


def test_checkpoint_of_another_problem_is_kept_aside(tmp_path):
    p = pair_problem()
    kw = dict(generations=3, offspring=4, tokens=(1,), survivors=(1,), init="uniform")
    ck = tmp_path / "search.json"
    ALLOCATORS.build("evolutionary", checkpoint=str(ck), seed=1, **kw).allocate(p, SumFitness(p))
    first = json.loads(ck.read_text())
    other = ALLOCATORS.build("evolutionary", checkpoint=str(ck), seed=2, **kw)
    other.allocate(p, SumFitness(p))
    assert other.resumed_at == 0  # a checkpoint was there, but not this search's: it started fresh
    assert json.loads(ck.read_text())["key"] != first["key"]
    aside = tmp_path / f"search.{first['key']}.json"
    assert json.loads(aside.read_text()) == first  # the other search's work is not lost


def test_uniform_with_named_levels_takes_the_same_name_everywhere():
    """Pareto-pruned named levels (byte budgets): "uniform" is the same level name in every unit,
    not the same index; a unit whose list lacks the name takes its best level costing no more."""
    from modelpress.allocate.problem import Problem
    from modelpress.allocate.uniform import Uniform

    full = ["w2", "w3", "w3-r16", "w4"]
    labels = [full, full, ["w2", "w4-s50", "w4"], full]  # unit 2: w3 and w3-r16 pruned
    costs = [[20, 30, 34, 40], [20, 30, 34, 40], [20, 29, 40], [20, 30, 34, 40]]
    errors = [[4, 2, 1.5, 1], [4, 2, 1.5, 1], [4, 1.8, 1], [4, 2, 1.5, 1]]
    groups = ["q", "q", "q", "q"]
    p = Problem(["a", "b", "c", "d"], costs, errors, budget=119, labels=labels, groups=groups)
    choice = Uniform().allocate(p)
    assert [labels[u][i] for u, i in enumerate(choice)] == ["w3", "w3", "w4-s50", "w3"]
    assert p.cost(choice) <= p.budget and p.slack_ok(choice)
    # all-w3 one over the budget (within 1%): the cheapest downgrade by error per cost (a: w3 -> w2),
    # then the slack is filled (b, d: w3 -> w3-r16)
    p = Problem(["a", "b", "c", "d"], costs, errors, budget=118, labels=labels, groups=groups)
    choice = Uniform().allocate(p)
    assert [labels[u][i] for u, i in enumerate(choice)] == ["w2", "w3-r16", "w4-s50", "w3-r16"]
    assert p.cost(choice) <= p.budget and p.slack_ok(choice)


@st.composite
def tied_problems(draw):
    """Units with the levels of a quant database (bits x numel), some of them tied in groups as a
    serving engine's fused layers are."""
    from modelpress.allocate.budget import _tied

    n = draw(st.integers(2, 9))
    bits = [2, 3, 4]
    numel = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    units = [f"u{i}" for i in range(n)]
    costs = [[b * m for b in bits] for m in numel]
    errors = [sorted(draw(st.lists(st.floats(0, 5, allow_nan=False), min_size=3, max_size=3)), reverse=True)
              for _ in range(n)]
    order = draw(st.permutations(range(n)))
    cut = draw(st.integers(2, n))
    ties = [[units[i] for i in sorted(order[:cut])]] if cut >= 2 else []
    total = int(draw(st.floats(2.0, 4.0)) * sum(numel))
    extra = {"block": list(range(n)), "numel": numel, "values": [list(bits)] * n}
    return _tied(units, costs, errors, total, [list(bits)] * n, ["g"] * n, extra, ties)


@pytest.mark.parametrize("name,kw", [("uniform", {}), ("dp", {}),
                                     ("evolutionary", dict(generations=3, offspring=4, tokens=(1, 2), survivors=(2, 1)))])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=tied_problems())
def test_budget_exactness_with_tied_units(name, kw, p):
    from modelpress.allocate.plan import Plan

    choice = _alloc(name, p, **kw)
    assert p.cost(choice) <= p.budget and p.slack_ok(choice)
    plan = Plan.from_choice(p, choice, "quant")
    for i in range(len(p.units)):  # every member of a tied unit gets its level
        assert len({plan.levels[m] for m in p.members(i)}) == 1
    assert sum(len(p.members(i)) for i in range(len(p.units))) == len(plan.levels)
    assert plan.choice(p) == choice


def test_checkpoint_measured_on_other_text_is_not_resumed(tmp_path):
    """The fitness's digest (its windows) is part of a checkpoint's key, like the problem."""
    class OnText(SumFitness):
        def __init__(self, p, text):
            super().__init__(p)
            self.text = text

        def digest(self):
            return self.text

    p = pair_problem()
    kw = dict(generations=3, offspring=4, tokens=(1,), survivors=(1,), init="uniform")
    ck = tmp_path / "search.json"
    ALLOCATORS.build("evolutionary", checkpoint=str(ck), **kw).allocate(p, OnText(p, "a"))
    same = ALLOCATORS.build("evolutionary", checkpoint=str(ck), **kw)
    same.allocate(p, OnText(p, "a"))
    assert same.resumed_at == 3
    other = ALLOCATORS.build("evolutionary", checkpoint=str(ck), **kw)
    other.allocate(p, OnText(p, "b"))
    assert other.resumed_at == 0
