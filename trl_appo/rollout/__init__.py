"""Multi-turn tool-using rollouts over token ids: the engine, the tool-call protocols, and `build_engine`."""

from .build import build_engine, completions_for_rewards, eos_token_ids_of
from .engine import Fork, GenerateFn, Prefix, Rollout, RolloutEngine
from .protocols import ChatTemplateProtocol, TagProtocol, ToolProtocol, TurnParse, model_runs

__all__ = [
    "ChatTemplateProtocol",
    "GenerateFn",
    "Fork",
    "Prefix",
    "Rollout",
    "RolloutEngine",
    "TagProtocol",
    "ToolProtocol",
    "TurnParse",
    "build_engine",
    "completions_for_rewards",
    "eos_token_ids_of",
    "model_runs",
]
