"""What every kind of level supplies to the database and the search.

A kind is a strategy: it names its units (`discover`), their levels (`values`, `order`), the bytes
every plan stores whatever its levels (`fixed_bytes`), how the missing levels of a database are
made (`build`), which budgets it accepts (`budgets`, `check_budget`) and how its levels read in a
plan (`labels`, `ylabel`). The database (levels.database) only stores what a kind builds: it never
asks which kind it holds.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from ...errors import ConfigError
from ...models.arch import Arch, get_weight
from ...registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ...allocate.budget import Budget
    from ...data.windows import Windows
    from ..database import LevelDB

KINDS: Registry = Registry("kind")


@dataclasses.dataclass
class UnitInfo:
    name: str
    shape: tuple[int, int] | None  # (out, in) for Linear units
    numel: int  # weights (parameters of a sub-block for depth)
    block: int
    group: str  # unit type, e.g. "q_proj" or "attn"
    extra: dict = dataclasses.field(default_factory=dict)


class Kind:
    registered_name: ClassVar[str]
    budgets: ClassVar[tuple[str, ...]] = ("mb",)
    tensors_per_unit: ClassVar[int] = 0  # most tensors a unit stores (file-header allowance of mb budgets)
    ylabel: ClassVar[str] = "level"  # what a level is, on the plots' axis
    # a level replaces a whole module (depth) rather than a weight: plans remove modules, and
    # "bits per weight" means nothing
    module_levels: ClassVar[bool] = False
    integer_levels: ClassVar[bool] = False  # every level is integer-quantized (compressed-tensors can hold it)
    streams: ClassVar[bool] = True  # a database and a search work on a streamed model (blocks on disk)
    # settings added after databases of this kind were first written, with the value that
    # reproduces the older behaviour: left out of stored settings and database keys at that value,
    # filled in when an older database is opened, so older databases keep opening as what they are
    legacy: ClassVar[dict] = {}
    default_for: ClassVar[tuple[str, ...]] = ()  # budgets for which this kind is the default
    # command-line options (without "--") -> the setting they give; lists are written "a,b,c"
    options: ClassVar[dict[str, str]] = {}

    # ---- settings ----------------------------------------------------------------------------
    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in self.legacy and v == self.legacy[k])}

    @classmethod
    def from_settings(cls, settings: dict) -> "Kind":
        return cls(**{**cls.legacy, **settings})

    @classmethod
    def settings_from_options(cls, given: dict[str, object]) -> dict:
        """Settings from the command-line options given ({option: value}); an option this kind
        does not take is a ConfigError that names it."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        out = {}
        for opt, value in given.items():
            if opt not in cls.options:
                takes = ", ".join(f"--{o}" for o in cls.options) or "no options"
                raise ConfigError(f"--{opt} does not apply to --kind {cls.registered_name} (it takes {takes})")
            setting = cls.options[opt]
            out[setting] = _parse_option(opt, value, types[setting])
        return out

    def resolve(self, model) -> None:
        """Fix settings that depend on the model (before they are compared with a stored database's)."""

    # ---- units and levels ----------------------------------------------------------------------
    def discover(self, model) -> list[UnitInfo]:
        """The units of `model`: by default every Linear of its decoder blocks."""
        arch = Arch(model)
        return [UnitInfo(name, tuple(get_weight(mod).shape), get_weight(mod).numel(), arch.block_of(name),
                         name.rsplit(".", 1)[-1], self.unit_extra(name, model))
                for name, mod in arch.all_linears().items()]

    def unit_extra(self, name: str, model) -> dict:
        """Per-unit data the kind needs later (stored in db.json with the unit)."""
        return {}

    def values(self, unit: UnitInfo) -> list:
        """Level values of a unit, cheapest first."""
        raise NotImplementedError

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        """The unit's usable levels, cheapest first (default: all of them)."""
        return self.values(unit)

    def labels(self, unit: UnitInfo, values: list) -> list:
        """How each level reads in a plan (the allocators that reason about levels use these)."""
        return list(values)

    # ---- what the database asks ------------------------------------------------------------
    def fixed_bytes(self, model, units: list[UnitInfo], tokenizer=None) -> int:
        """Bytes every plan stores whatever its levels (float16 tensors outside the units)."""
        from ..database import fixed_bytes

        return fixed_bytes(model, units)

    def usable(self, db: "LevelDB", unit: str) -> list:
        """Usable levels of `unit` in `db`, cheapest first."""
        return self.order(db.units[unit], db.levels_of(unit))

    def missing(self, db: "LevelDB") -> dict[str, list]:
        """unit -> level values not yet built."""
        out = {}
        for u, info in db.units.items():
            have = db.levels_of(u)
            miss = [v for v in self.values(info) if str(v) not in have]
            if miss:
                out[u] = miss
        return out

    def level_meta(self, db: "LevelDB", unit: str, value) -> dict:
        """{"nbytes", "error", ...} of one level."""
        return db.levels_of(unit)[str(value)]

    def build(self, db: "LevelDB", model, windows: "Windows", batch_size: int, device) -> None:
        """Make every missing level of `db` (resumable: what is on disk is not made again)."""
        raise NotImplementedError

    def ties(self, units: dict[str, UnitInfo]) -> list[list[str]]:
        """Groups of units that must share one level (a serving engine's fused layers); none by default."""
        return []

    def check_budget(self, budget: "Budget") -> None:
        """Raise BudgetError if `budget` (one of `budgets`) is out of this kind's range."""


def _parse_option(opt: str, value, annotation: str):
    """A command-line value as the setting's type: "2,3,4" for tuples of int / float / str; 0 for
    an optional int means none (e.g. --group-size 0: one group per row)."""
    if annotation.startswith("tuple") and isinstance(value, str):
        cast = next((c for name, c in (("int", int), ("float", float)) if f"[{name}" in annotation), str)
        try:
            return tuple(cast(x.strip()) for x in value.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--{opt}: expected a comma-separated list, got {value!r}") from None
    if annotation == "int | None" and value == 0:
        return None
    return value


def kind_for_budget(budget: str) -> str:
    """The kind a budget searches over when none is named (bits, mb: quant; sparsity; drop: depth)."""
    for name in KINDS.names():
        if budget in KINDS.get(name).default_for:
            return name
    raise ConfigError(f"no kind is the default for a {budget} budget; name one with --kind")


def pareto(built: dict[str, dict]) -> list:
    """Levels no other level beats on both bytes and error, cheapest first (equal bytes: the more
    accurate one)."""
    cands = sorted((m["nbytes"], m["error"], v) for v, m in built.items())
    out: list = []
    for nbytes, err, v in cands:
        if out and nbytes == built[out[-1]]["nbytes"]:
            continue  # sorted by error within equal bytes: the first one was the best
        if not out or err < built[out[-1]]["error"]:
            out.append(v)
    return out
