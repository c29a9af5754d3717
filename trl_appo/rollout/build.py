"""`build_engine`: the one way a `RolloutEngine` is assembled, so training and evaluation stop where each other do.

Used by `APPOTrainer` (roots and branches), `trl_appo.evaluation.evaluate`, `trl-appo eval`, the demo and the
benchmarks. The rules it owns:

* `protocol="tags"` (the paper's `<python>`/`<search>` tags): with tools, the tags `python`, `search` and every
  registered tool's name stop generation (the paper's tags stop it even when that tool is not registered, and the
  model is told so); without tools there is nothing to stop for: one model turn, as GRPOTrainer generates.
* `protocol="chat"`: the chat template's tool calls (`ChatTemplateProtocol`); with tools, TRL's prefix-preserving
  training variant of the template where the tokenizer's is not (as GRPOTrainer does, e.g. Qwen3).
* Every end-of-sequence id (`eos_token_ids`: the tokenizer's and the model's generation config's, as TRL
  collects them, see `eos_token_ids_of`) ends a model run.
* Without tools a call-shaped text ends the episode as it stands (`max_tool_calls=0`, `on_tool_limit="end"`)
  instead of earning a "malformed tool call" turn and another assistant turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..tools.base import DEFAULT_MAX_CONCURRENT_CALLS
from .engine import DEFAULT_MAX_TOOL_CALLS_PER_TURN, GenerateFn, RolloutEngine
from .protocols import ChatTemplateProtocol, TagProtocol, ToolProtocol

__all__ = ["build_engine", "completions_for_rewards", "eos_token_ids_of"]

PROTOCOLS = ("tags", "chat")


def build_engine(
    generate_fn: GenerateFn | None,
    tokenizer: Any,
    tools: Iterable[Any] | None = None,
    *,
    protocol: str | ToolProtocol = "tags",
    max_completion_length: int = 1024,
    max_tool_calls: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    chat_template_kwargs: dict | None = None,
    tool_timeout: float | None = None,
    max_tool_output_chars: int | None = None,
    max_tool_calls_per_turn: int | None = DEFAULT_MAX_TOOL_CALLS_PER_TURN,
    max_concurrent_tool_calls: int | None = DEFAULT_MAX_CONCURRENT_CALLS,
    on_malformed_tool_call: str = "end",
    should_continue: Callable[[bool], bool] | None = None,
) -> RolloutEngine:
    """A `RolloutEngine` with training's stop rules (module docstring).

    Args:
        generate_fn: the engine's generation backend (`GenerateFn`).
        tools: functions or `trl_appo.tools.Tool` objects (or a `ToolRegistry`, used as is).
        protocol: "tags" or "chat", or a `ToolProtocol` object, used as given (its stop ids are its own).
        eos_token_ids: ids that end a model run besides the protocol's; default the tokenizer's eos id.
        tool_timeout, max_tool_output_chars: the tool registry's limits (default: `ToolRegistry`'s).
        max_tool_calls_per_turn: calls one model turn may run (None: unlimited); the turn's further calls are refused.
        max_concurrent_tool_calls: calls running at once over all rollouts of the registry (None: unlimited).
        on_malformed_tool_call: chat protocol, a call its parser cannot read: "end" (default, as GRPOTrainer: the
            turn stands as text and the episode ends) or "message" (the model gets a tool error and another turn).
        should_continue: the multi-process "any rank still active?" collective (the trainer's).
    """
    from ..tools import ToolRegistry

    tools = tools if isinstance(tools, ToolRegistry) else list(tools or [])
    has_tools = bool(tools.names if isinstance(tools, ToolRegistry) else tools)
    if isinstance(tools, ToolRegistry):
        registry = tools
    else:
        limits = {k: v for k, v in (("timeout", tool_timeout), ("max_output_chars", max_tool_output_chars))
                  if v is not None}
        registry = ToolRegistry(tools, max_concurrent=max_concurrent_tool_calls, **limits)
    if not isinstance(protocol, str):
        engine_protocol = protocol
    elif protocol == "chat":
        engine_protocol = ChatTemplateProtocol(
            tokenizer, chat_template_kwargs=_training_template_kwargs(tokenizer, chat_template_kwargs, has_tools),
            on_malformed=on_malformed_tool_call)
    elif protocol == "tags":
        tags = dict.fromkeys(("python", "search", *registry.names)) if has_tools else {}
        engine_protocol = TagProtocol(tokenizer, tags=tuple(tags), chat_template_kwargs=chat_template_kwargs)
    else:
        raise ValueError(f"protocol={protocol!r} is not valid; choose one of {list(PROTOCOLS)} or pass a ToolProtocol.")
    if isinstance(protocol, str):
        eos = [tokenizer.eos_token_id] if eos_token_ids is None else list(eos_token_ids)
        engine_protocol.stop_token_ids = frozenset(engine_protocol.stop_token_ids) | frozenset(
            i for i in eos if i is not None)
    return RolloutEngine(
        generate_fn,
        tokenizer,
        engine_protocol,
        registry,
        max_completion_length=max_completion_length,
        max_tool_calls=max_tool_calls if has_tools else 0,
        on_tool_limit="message" if has_tools else "end",
        should_continue=should_continue,
        max_tool_calls_per_turn=max_tool_calls_per_turn,
    )


def _training_template_kwargs(tokenizer: Any, chat_template_kwargs: dict | None, has_tools: bool) -> dict:
    """As GRPOTrainer: multi-turn tool rollouts need a prefix-preserving chat template (e.g. Qwen3's drops earlier
    turns' thinking); TRL's training variant of the template is used where the tokenizer's is not."""
    kwargs = dict(chat_template_kwargs or {})
    if not has_tools or "chat_template" in kwargs or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return kwargs
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if not is_chat_template_prefix_preserving(tokenizer):
        template = get_training_chat_template(tokenizer)
        if template is not None:
            kwargs["chat_template"] = template
    return kwargs


def eos_token_ids_of(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id TRL's GRPOTrainer stops at: the model generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def completions_for_rewards(prompts: list, rollouts: list) -> list:
    """What reward functions receive as `completions`: the engine's multi-turn messages for conversational prompts
    (assistant/tool turns), else each rollout's `reward_text` (the model's tokens, tool output as escaped <result>
    blocks; never the decoded completion, whose tool output would read as the model's own text)."""
    from trl.data_utils import is_conversational

    if prompts and is_conversational({"prompt": prompts[0]}):
        return [r.messages for r in rollouts]
    return [r.reward_text for r in rollouts]


def executed_tool_calls(rollouts: list) -> list[dict[str, int]]:
    """Per rollout, {tool name: calls that ran} (a branch's prefix included): what reward functions get as the
    keyword `executed_tool_calls`, so tool-use bonuses count executed calls, never tags the model typed."""
    return [dict(r.executed_tool_calls) for r in rollouts]
