from .database import LevelDB, PlanState, discover_units, model_fingerprint
from .kinds import KINDS, DepthKind, GGUFKind, JointKind, QuantKind, SparsityKind, UnitInfo

__all__ = ["KINDS", "DepthKind", "GGUFKind", "JointKind", "LevelDB", "PlanState", "QuantKind", "SparsityKind", "UnitInfo",
           "discover_units", "model_fingerprint"]
