"""Plans: unit name -> level, saved as JSON beside the checkpoint, checked against a database."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ConfigError
from ..utils.io import CorruptFileError, read_json, write_json

FORMAT = "modelpress-plan"


@dataclasses.dataclass
class Plan:
    kind: str
    levels: dict[str, object]
    budget: dict | None = None
    allocator: dict | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_choice(cls, problem, choice: list[int], kind: str, **kw) -> "Plan":
        vals = problem.extra["values"]
        return cls(kind=kind, levels={m: vals[i][c] for i, c in enumerate(choice) for m in problem.members(i)}, **kw)

    def choice(self, problem) -> list[int]:
        vals = problem.extra["values"]
        out = []
        for i in range(len(problem.units)):
            got = {self.levels[m] for m in problem.members(i)}
            if len(got) != 1:
                raise ConfigError(f"plan gives the tied layers {', '.join(problem.members(i))} different levels")
            out.append(vals[i].index(got.pop()))
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), checksum=True)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        if not Path(path).is_file():
            raise ConfigError(f"plan {path} does not exist; give the plan.json a search wrote")
        try:
            d = read_json(path, "plan", 'write it again (`modelpress search ... --out`); if you edited it by hand, '
                                        'delete its "sha256" line')
        except OSError as e:
            raise ConfigError(f"cannot read plan {path}: {e}") from None
        except CorruptFileError as e:
            raise ConfigError(str(e)) from None
        if d.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a modelpress plan")
        d.pop("format")
        d.pop("sha256", None)
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"plan {path} is malformed: {e}") from None

    def validate(self, db) -> None:
        """Every unit of the database has a level it knows, and nothing else."""
        if self.kind != db.kind.registered_name:
            raise ConfigError(f"plan is for kind {self.kind!r} but the database holds {db.kind.registered_name!r}")
        unknown = [u for u in self.levels if u not in db.units]
        if unknown:
            raise ConfigError(f"plan names unknown units: {', '.join(unknown[:3])}"
                              + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""))
        missing = [u for u in db.units if u not in self.levels]
        if missing:
            raise ConfigError(f"plan gives no level for {len(missing)} units, e.g. {missing[0]}")
        for u, v in self.levels.items():
            allowed = db.values(u)
            if v not in allowed:
                raise ConfigError(f"plan gives {u} level {v!r}; its levels are {allowed}")
