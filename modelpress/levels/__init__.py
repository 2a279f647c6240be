from .database import LevelDB, PlanState, discover_units, model_fingerprint
from .kinds import KINDS, DepthKind, QuantKind, SparsityKind, UnitInfo

__all__ = ["KINDS", "DepthKind", "LevelDB", "PlanState", "QuantKind", "SparsityKind", "UnitInfo",
           "discover_units", "model_fingerprint"]
