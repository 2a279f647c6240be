from .influence import subblock_influence

__all__ = ["subblock_influence"]
