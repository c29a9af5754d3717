"""Multi-turn tool-using rollouts over token ids: the engine and the tool-call protocols."""

from .engine import GenerateFn, Prefix, Rollout, RolloutEngine
from .protocols import ChatTemplateProtocol, TagProtocol, ToolProtocol, TurnParse, model_runs

__all__ = [
    "ChatTemplateProtocol",
    "GenerateFn",
    "Prefix",
    "Rollout",
    "RolloutEngine",
    "TagProtocol",
    "ToolProtocol",
    "TurnParse",
    "model_runs",
]
