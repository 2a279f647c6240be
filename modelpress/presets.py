"""Named search configs sized for a machine: what `modelpress compress --target-bits ...` runs.

    budget_config(Budget("bits", 3), machine="cpu")   # the CPU demo's search
    machine_for(device)                              # "gpu" on CUDA, else "cpu"

The numbers and why they are what they are: docs/presets.md.
"""
from __future__ import annotations

import torch

from .allocate.budget import Budget
from .data.defaults import DEFAULT_CALIBRATION
from .data.windows import DataConfig
from .errors import ConfigError
from .levels.kinds import kind_for_budget
from .search import SearchConfig, SearchSettings

# per machine: the quant levels, the calibration windows, the fitness windows and the evolutionary search
PRESETS: dict[str, dict] = {
    "cpu": {"levels": (2, 3, 4), "n_samples": 128, "fitness_windows": 16, "validation_windows": 4,
            "search": {"generations": 12, "offspring": 8, "tokens": (1024, 4096), "survivors": (2, 1)}},
    "gpu": {"levels": (2, 3, 4, 5, 6), "n_samples": 512, "fitness_windows": 64, "validation_windows": 4,
            "search": {"generations": 150, "offspring": 32, "tokens": (1024, 8192), "survivors": (4, 1)}},
}


def machine_for(device: str | None) -> str:
    return "gpu" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"


def preset_search(machine: str = "cpu", *, corpus: str = DEFAULT_CALIBRATION, n_samples: int | None = None,
                  seq_len: int = 512, seed: int = 0) -> dict:
    """The machine's calibration data, evolutionary search and fitness windows, as SearchConfig
    keyword arguments: what every preset search shares, whatever its kind."""
    if machine not in PRESETS:
        raise ConfigError(f"unknown machine preset {machine!r}; use one of {', '.join(PRESETS)}")
    p = PRESETS[machine]
    data = DataConfig(corpus=corpus, n_samples=p["n_samples"] if n_samples is None else n_samples, seq_len=seq_len, seed=seed)
    return dict(allocator="evolutionary", allocator_settings={**p["search"], "seed": seed}, data=data,
                fitness=SearchSettings(fitness_windows=p["fitness_windows"], validation_windows=p["validation_windows"]))


def budget_config(budget: Budget, *, machine: str = "cpu", corpus: str = DEFAULT_CALIBRATION,
                  n_samples: int | None = None, seq_len: int = 512, seed: int = 0,
                  level_settings: dict | None = None, **config) -> SearchConfig:
    """The search `compress` runs for `budget` on `machine`: quant levels for bits / MB budgets
    (sparsity levels for a sparsity budget), all calibrated on the inputs of the level nearest the
    budget, the evolutionary search against the uniform plan; calibration on `corpus`
    (`n_samples` windows, default the machine's). `level_settings` go to the kind
    (the quantizer's sym / act_order / mse / shrink / group_size, or sparsity's refit_iters);
    `config` to SearchConfig (out, evaluate, eval_suite, n_eval, export, ...)."""
    shared = preset_search(machine, corpus=corpus, n_samples=n_samples, seq_len=seq_len, seed=seed)
    if budget.kind == "drop":
        raise ConfigError("a depth budget is searched with `modelpress search --drop N`")
    sparse = budget.kind == "sparsity"
    kind_settings = dict(level_settings or {})
    if not sparse:
        kind_settings = {"levels": PRESETS[machine]["levels"], "group_size": 64, **kind_settings}
    if budget.kind == "bits":
        # every level on the inputs of the level nearest the budget: one pass, and on smollm2 at 3 bits
        # better plans than calibrating each level on its own level's model (docs/presets.md)
        kind_settings["sequential_level"] = min(kind_settings["levels"], key=lambda b: (abs(b - budget.value), b))
    return SearchConfig(budget=budget, kind=kind_for_budget(budget.kind), kind_settings=kind_settings,
                        compare=("uniform",), **shared, **config)
