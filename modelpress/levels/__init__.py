from .database import LevelDB, PlanState, discover_units, model_fingerprint
from .kinds import KINDS, DepthKind, JointKind, QuantKind, SparsityKind, UnitInfo

__all__ = ["KINDS", "DepthKind", "JointKind", "LevelDB", "PlanState", "QuantKind", "SparsityKind", "UnitInfo",
           "discover_units", "model_fingerprint"]
