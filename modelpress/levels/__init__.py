from .database import LevelDB, discover_units, model_fingerprint
from .kinds import KINDS, DepthKind, GGUFKind, JointKind, Kind, LowRankKind, QuantKind, SparsityKind, UnitInfo
from .state import PlanState

__all__ = ["KINDS", "DepthKind", "GGUFKind", "JointKind", "Kind", "LevelDB", "LowRankKind", "PlanState", "QuantKind",
           "SparsityKind", "UnitInfo", "discover_units", "model_fingerprint"]
