from .database import LevelDB, PlanState, discover_units, model_fingerprint
from .kinds import KINDS, DepthKind, GGUFKind, JointKind, LowRankKind, QuantKind, SparsityKind, UnitInfo

__all__ = ["KINDS", "DepthKind", "GGUFKind", "JointKind", "LevelDB", "LowRankKind", "PlanState", "QuantKind", "SparsityKind", "UnitInfo",
           "discover_units", "model_fingerprint"]
