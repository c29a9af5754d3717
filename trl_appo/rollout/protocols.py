"""Tool-call protocols: how tool calls look in token space, and how tool results are appended.

A protocol owns the format, never the loop (that is `rollout.engine`). It answers four questions for the
engine, always on token ids (ids are never re-derived from decoded text):

* where a turn stops: `stop_token_ids` (end of turn / episode) and `stop_strings` (e.g. `</python>`);
* what a finished model run asks for: `parse_turn(run_ids, context_ids, end)` -> calls, or end of episode;
* which ids to append for the results: `render_results(calls, results, context_ids)` (masked with 0);
* what reward functions receive: `messages(prompt_ids, completion_ids, model_mask, known_tool_messages)`.

Two protocols:

* `ChatTemplateProtocol`: the chat template's own tool calls, as TRL and transformers do them (JSON schemas
  from `get_json_schema`, parsing with `trl.chat_template_utils.parse_response`, tool turns rendered by the
  template and appended as the suffix ids of a dummy conversation, like TRL's `_get_tool_suffix_ids`).
* `TagProtocol`: the paper's `<python>…</python>` / `<search>…</search>` calls answered with
  ` <result>\\n…\\n</result>` (docs/algorithm.md §6). Messages are one assistant message with the decoded completion.

A "model run" is a maximal stretch of completion tokens with mask 1 (one assistant turn, or the part of it
generated so far); a "tool run" is a stretch with mask 0 (tool output and template glue).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..rewards import escape_tool_output
from ..tools.base import ToolCall, ToolRegistry, ToolResult

RunEnd = Literal["eos", "stop"] | None  # how a model run ended: end-of-turn token, stop string, or still open


@dataclass
class TurnParse:
    """What a finished model run asks for: `calls` to execute, or `ends_episode`."""

    calls: list[ToolCall] = field(default_factory=list)
    ends_episode: bool = False


def model_runs(model_mask: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a mask into maximal runs `(start, end, value)` (end exclusive)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(model_mask) + 1):
        if i == len(model_mask) or model_mask[i] != model_mask[start]:
            runs.append((start, i, int(model_mask[start])))
            start = i
    return runs


class ToolProtocol(ABC):
    """Base class of tool-call formats (see the module docstring for the four questions it answers)."""

    stop_strings: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.stop_token_ids: frozenset[int] = frozenset({tokenizer.eos_token_id})

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run_end(self, run_ids: Sequence[int]) -> RunEnd:
        """How a model run ended: at an end-of-turn token, at a stop string, or not yet."""
        if run_ids and run_ids[-1] in self.stop_token_ids:
            return "eos"
        if self.stop_strings and run_ids:
            text = self.decode(run_ids)
            if any(text.endswith(s) for s in self.stop_strings):
                return "stop"
        return None

    @abstractmethod
    def tokenize_prompt(self, prompt: str | list[dict], tools: ToolRegistry) -> list[int]:
        """Prompt ids for a conversational (list of messages) or plain-text prompt."""

    @abstractmethod
    def parse_turn(self, run_ids: list[int], context_ids: list[int], end: RunEnd, tools: ToolRegistry) -> TurnParse:
        """The calls of a model run that ended (`end` is not None), or whether it ends the episode."""

    @abstractmethod
    def render_results(
        self, calls: list[ToolCall], results: list[ToolResult], context_ids: list[int]
    ) -> tuple[list[int], list[dict]]:
        """Ids to append after the calls (all masked 0) and the tool messages they stand for."""

    @abstractmethod
    def messages(
        self,
        prompt_ids: list[int],
        completion_ids: list[int],
        model_mask: list[int],
        known_tool_messages: dict[int, list[dict]],
        tools: ToolRegistry,
    ) -> list[dict]:
        """What reward functions receive. `known_tool_messages[start]` holds the tool messages of the tool run
        starting at completion offset `start` when the engine appended it; others are recovered from ids."""


class TagProtocol(ToolProtocol):
    """The paper's protocol: `<tag>body</tag>` calls, ` <result>\\n…\\n</result>` answers, episode ends at eos.

    Args:
        tokenizer: any tokenizer with an eos token (the end of the episode).
        tags: tool names usable as tags; generation stops at any of their closing tags.
        result_template: how a result is appended (`{content}` is the tool's text).
        chat_template_kwargs: extra `apply_chat_template` arguments for conversational prompts.
    """

    def __init__(
        self,
        tokenizer: Any,
        tags: Sequence[str] = ("python", "search"),
        result_template: str = " <result>\n{content}\n</result>",
        chat_template_kwargs: dict | None = None,
    ):
        super().__init__(tokenizer)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tags = tuple(tags)
        self.stop_strings = tuple(f"</{t}>" for t in self.tags)
        self.result_template = result_template

    def tokenize_prompt(self, prompt: str | list[dict], tools: ToolRegistry) -> list[int]:
        # Tools are described in the system prompt by the dataset (as in ARPO), so no schemas are rendered.
        if isinstance(prompt, str):
            return self.encode(prompt)
        return list(
            self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False, **self.chat_template_kwargs
            )
        )

    def parse_turn(self, run_ids: list[int], context_ids: list[int], end: RunEnd, tools: ToolRegistry) -> TurnParse:
        if end == "eos":
            return TurnParse(ends_episode=True)
        if end != "stop":
            return TurnParse()
        # Only this run is searched, so tags in the prompt (ARPO's system prompt has them) never count.
        text = self.decode(run_ids)
        tag = next(t for t in self.tags if text.endswith(f"</{t}>"))
        open_tag, close_tag = f"<{tag}>", f"</{tag}>"
        body_end = len(text) - len(close_tag)
        start = text.rfind(open_tag, 0, body_end)
        if start < 0:
            return TurnParse([ToolCall(tag, "", error=f"malformed call: '{close_tag}' without a matching '{open_tag}'")])
        body = text[start + len(open_tag) : body_end].strip()
        if not body:
            return TurnParse([ToolCall(tag, "", error=f"empty {open_tag} call: nothing to run")])
        return TurnParse([ToolCall(tag, body)])

    def render_results(
        self, calls: list[ToolCall], results: list[ToolResult], context_ids: list[int]
    ) -> tuple[list[int], list[dict]]:
        # Escaped, so an output containing "</result><answer>..." cannot pass for the model's own text.
        text = "".join(self.result_template.format(content=escape_tool_output(r.content)) for r in results)
        return self.encode(text), [{"role": "tool", "name": r.name, "content": r.content} for r in results]

    def messages(self, prompt_ids, completion_ids, model_mask, known_tool_messages, tools) -> list[dict]:
        # The paper's reward reads the whole completion text, tool results included.
        return [{"role": "assistant", "content": self.decode(completion_ids, skip_special_tokens=True)}]


class ChatTemplateProtocol(ToolProtocol):
    """Tool calls in the chat template's own format (Qwen's `<tool_call>{json}</tool_call>`, ...), as TRL does.

    Needs a tokenizer whose chat template renders tool calls and tool messages and which has a response
    parser (`response_template`; TRL's `add_response_schema` sets one for templates it knows). The turn ends at
    the eos token, which must be the end-of-turn token (`<|im_end|>` for ChatML; trl_appo.testing describes the eos trap).

    Args:
        tokenizer: the tool-aware tokenizer.
        chat_template_kwargs: extra `apply_chat_template` arguments (e.g. `enable_thinking`).
    """

    def __init__(self, tokenizer: Any, chat_template_kwargs: dict | None = None):
        super().__init__(tokenizer)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        template = getattr(tokenizer, "response_template", None) or {}
        # The marker that opens a call: counting it finds calls the parser could not read (malformed JSON).
        self.call_open = template.get("fields", {}).get("tool_calls", {}).get("open", "<tool_call>")
        self._dummy_prefix: dict[str, list[int]] = {}

    def _render(self, messages: list[dict], add_generation_prompt: bool, **kwargs: Any) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                **self.chat_template_kwargs,
                **kwargs,
            )
        )

    def tokenize_prompt(self, prompt: str | list[dict], tools: ToolRegistry) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        return self._render(prompt, add_generation_prompt=True, tools=tools.schemas() or None)

    def _parse_message(self, run_ids: list[int], context_ids: list[int], tools: ToolRegistry) -> dict:
        from trl.chat_template_utils import parse_response

        return parse_response(self.tokenizer, list(run_ids), prefix=list(context_ids), tools=tools.schemas() or None)

    def parse_turn(self, run_ids: list[int], context_ids: list[int], end: RunEnd, tools: ToolRegistry) -> TurnParse:
        if end != "eos":
            return TurnParse()
        try:
            message = self._parse_message(run_ids, context_ids, tools)
            calls = [self._to_call(c) for c in message.get("tool_calls") or []]
        except Exception as exc:  # noqa: BLE001 - any parser failure (RecursionError on deep JSON, ...)
            # is the model's malformed call, told to the model, never an exception out of the rollout.
            n_open = max(1, self.decode(run_ids).count(self.call_open))
            error = f"malformed tool call: could not parse it ({type(exc).__name__})"
            return TurnParse(calls=[ToolCall("unknown", {}, error=error) for _ in range(n_open)])
        # A call the parser could not read vanishes from the message (parse_response falls back to text):
        # count the opening markers so the model is told about it instead of the episode silently ending.
        n_open = self.decode(run_ids).count(self.call_open)
        for _ in range(n_open - len(calls)):
            calls.append(ToolCall("unknown", {}, error="malformed tool call: could not parse its JSON"))
        return TurnParse(calls=calls, ends_episode=not calls)

    @staticmethod
    def _to_call(tool_call: dict) -> ToolCall:
        if not isinstance(tool_call, dict):
            return ToolCall("unknown", {}, error="malformed tool call: not a JSON object")
        function = tool_call.get("function", tool_call)
        if not isinstance(function, dict):
            return ToolCall("unknown", {}, error="malformed tool call: 'function' is not a JSON object")
        name = function.get("name", "unknown")
        name = name if isinstance(name, str) else "unknown"
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # some templates keep the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                return ToolCall(name, {}, error=f"malformed arguments for tool '{name}': {exc}")
            except (RecursionError, ValueError, MemoryError) as exc:  # e.g. JSON nested 1000 deep
                return ToolCall(name, {}, error=f"malformed arguments for tool '{name}': {type(exc).__name__}")
        if not isinstance(arguments, dict):
            return ToolCall(name, {}, error=f"arguments of tool '{name}' must be a JSON object")
        return ToolCall(name, arguments)

    def tool_suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """Ids of the rendered tool turn plus the next assistant header (TRL's `_get_tool_suffix_ids`).

        Renders a dummy conversation with and without the tool messages and keeps the difference, cutting the
        dummy at its last eos so the boundary is the end-of-turn token (not eos + newline).
        """
        name = tool_messages[0]["name"]
        prefix = self._dummy_prefix.get(name)
        if prefix is None:
            prefix = self._render(self._dummy(name), add_generation_prompt=False)
            eos = [i for i, t in enumerate(prefix) if t == self.tokenizer.eos_token_id]
            if eos:
                prefix = prefix[: eos[-1] + 1]
            self._dummy_prefix[name] = prefix
        full = self._render(self._dummy(name) + tool_messages, add_generation_prompt=True)
        if full[: len(prefix)] != prefix:
            raise ValueError("Unexpected tokenization: the eos-trimmed dummy prefix is not a prefix of the full ids.")
        return full[len(prefix) :]

    @staticmethod
    def _dummy(name: str) -> list[dict]:
        call = {"type": "function", "function": {"name": name, "arguments": {}}}
        return [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def render_results(
        self, calls: list[ToolCall], results: list[ToolResult], context_ids: list[int]
    ) -> tuple[list[int], list[dict]]:
        tool_messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        return self.tool_suffix_ids(tool_messages), tool_messages

    def messages(self, prompt_ids, completion_ids, model_mask, known_tool_messages, tools) -> list[dict]:
        messages: list[dict] = []
        last_calls: list[ToolCall] = []
        for start, end, is_model in model_runs(model_mask):
            run = completion_ids[start:end]
            context = prompt_ids + completion_ids[:start]
            if is_model:
                try:
                    message = self._parse_message(run, context, tools)
                    last_calls = [self._to_call(c) for c in message.get("tool_calls") or []]
                except Exception:  # noqa: BLE001 - unparseable (e.g. nested too deep): keep the raw text
                    message = {"role": "assistant", "content": self.decode(run, skip_special_tokens=True)}
                    last_calls = []
                messages.append(message)
            elif start in known_tool_messages:
                messages.extend(known_tool_messages[start])
            else:
                messages.extend(self.recover_tool_messages(run, last_calls))
        return messages

    def recover_tool_messages(self, run_ids: list[int], calls: list[ToolCall]) -> list[dict]:
        """Tool messages of a tool run in a branch's prefix, read back through the template.

        Renders the same tool turn with sentinel contents, turns it into a regex, and matches the decoded run;
        falls back to one tool message holding the run's text when the template does not fit.
        """
        names = [c.name for c in calls] or ["unknown"]
        sentinels = [f"@@APPO_TOOL_{i}@@" for i in range(len(names))]
        probe = [{"role": "tool", "name": n, "content": s} for n, s in zip(names, sentinels, strict=True)]
        text = self.decode(run_ids)
        try:
            pattern = re.escape(self.decode(self.tool_suffix_ids(probe)))
            for s in sentinels:
                pattern = pattern.replace(re.escape(s), "(.*?)", 1)
            match = re.fullmatch(pattern, text, flags=re.DOTALL)
        except (ValueError, re.error):
            match = None
        if match is None:
            return [{"role": "tool", "name": names[0], "content": text}]
        return [{"role": "tool", "name": n, "content": c} for n, c in zip(names, match.groups(), strict=True)]
