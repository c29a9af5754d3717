"""Tool-call protocols: how tool calls look in token space, and how tool results are appended.

A protocol owns the format, never the loop (that is `rollout.engine`). It answers four questions for the
engine, always on token ids (ids are never re-derived from decoded text):

* where a turn stops: `stop_token_ids` (end of turn / episode) and `stop_strings` (e.g. `</python>`);
* what a finished model run asks for: `parse_turn(run_ids, context_ids, end)` -> calls, or end of episode;
* which ids to append for the results: `render_results(calls, results, context_ids)` (masked with 0);
* what reward functions receive: `messages(prompt_ids, completion_ids, model_mask, known_tool_messages)`.

Tool output is untrusted text (a search snippet, or what the model's own code prints). It is encoded by
`encode_pieces`, which never lets it yield an added or special token id: `<|im_start|>`, `<|im_end|>`,
`<|endoftext|>`, `<tool_call>`, the tag tokens ... in tool output become ordinary text tokens, so tool output can
neither plant control ids in the policy's context nor vanish from a `skip_special_tokens` decode. Only the
template's own glue around it is encoded with special-token parsing. Benign output gets exactly the ids a plain
`tokenizer(text)` of the whole rendering gives.

Two protocols:

* `ChatTemplateProtocol`: the chat template's own tool calls, as TRL and transformers do them (JSON schemas
  from `get_json_schema`, parsing with `trl.chat_template_utils.parse_response`, tool turns rendered by the
  template and appended as the suffix ids of a dummy conversation, like TRL's `_get_tool_suffix_ids`).
* `TagProtocol`: the paper's `<python>…</python>` / `<search>…</search>` calls answered with
  ` <result>\\n…\\n</result>` (docs/algorithm.md §6). Messages are one assistant message: the model's
  runs decoded, each tool output re-inserted as a fixed escaped result block (never the completion decoded whole).

A "model run" is a maximal stretch of completion tokens with mask 1 (one assistant turn, or the part of it
generated so far); a "tool run" is a stretch with mask 0 (tool output and template glue).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..rewards import escape_tool_output, result_block
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
        """Ids of trusted text (prompts, template glue): special tokens in it are parsed."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that untrusted text must never yield: every added token (special or not) and every special id."""
        ids = getattr(self, "_control_ids", None)
        if ids is None:
            ids = frozenset(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
            ids |= frozenset(getattr(self.tokenizer, "all_special_ids", []) or [])
            self._control_ids = ids
        return ids

    def _plain_backend(self) -> Any:
        """The fast tokenizer's pipeline without its added vocabulary (None for a slow tokenizer)."""
        if not hasattr(self, "_plain"):
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self._plain = None
            if backend is not None:
                from tokenizers import Tokenizer

                spec = json.loads(backend.to_str())
                spec["added_tokens"], spec["truncation"], spec["padding"] = [], None, None
                self._plain = Tokenizer.from_str(json.dumps(spec))
        return self._plain

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of untrusted text alone: normaliser, pre-tokeniser and model only, never a control id."""
        if not text:
            return []
        plain = self._plain_backend()

        def enc(t: str) -> list[int]:
            if plain is not None:
                return list(plain.encode(t, add_special_tokens=False).ids)
            return list(self.tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])

        ids = enc(text)
        control = self.control_ids
        if control.isdisjoint(ids):
            return ids
        # A vocabulary whose ordinary merges spell a control token (or a slow tokenizer that still matched a
        # non-special added token): character by character, and whatever is still a control id is dropped.
        return [i for ch in text for i in enc(ch) if i not in control]

    def encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Ids of the concatenated `(text, trusted)` pieces, where untrusted text never yields a control id.

        Encodes the whole text once, as `encode` does; if an added/special token matched inside (or across the
        edge of) an untrusted piece, the text is re-encoded with only the control tokens that lie wholly in
        trusted pieces kept, and every stretch between them encoded without the added vocabulary. So benign tool
        output gets exactly the ids of a plain encode (TRL's rendering), and hostile output only text ids.
        """
        text = "".join(t for t, _ in pieces)
        spans, pos = [], 0
        for t, trusted in pieces:
            if not trusted and t:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        control = self.control_ids
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # slow tokenizer: no offsets; encode piece by piece
            return [i for t, trusted in pieces for i in (self.encode(t) if trusted else self._plain_ids(t))]
        encoding = backend.encode(text, add_special_tokens=False)

        def untrusted(start: int, end: int) -> bool:
            return any(start < b and a < max(end, start + 1) for a, b in spans)

        tokens = list(zip(encoding.ids, encoding.offsets, strict=True))
        if not any(i in control and untrusted(*span) for i, span in tokens):
            return list(encoding.ids)
        ids, pos = [], 0
        for i, (start, end) in tokens:
            if i in control and not untrusted(start, end) and start >= pos:
                ids += self._plain_ids(text[pos:start])
                ids.append(i)
                pos = end
        return ids + self._plain_ids(text[pos:])

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
        parts = result_template.format(content="\x00").split("\x00")
        if len(parts) != 2:
            raise ValueError(f"result_template must contain '{{content}}' exactly once, got {result_template!r}")
        self._result_before, self._result_after = parts

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
        # Escaped, so the model reads "</result>" in an output as text; encoded as untrusted, so no special token.
        pieces: list[tuple[str, bool]] = []
        for r in results:
            pieces += [(self._result_before, True), (escape_tool_output(r.content), False), (self._result_after, True)]
        return self.encode_pieces(pieces), [{"role": "tool", "name": r.name, "content": r.content} for r in results]

    def messages(self, prompt_ids, completion_ids, model_mask, known_tool_messages, tools) -> list[dict]:
        """One assistant message: the model's runs decoded, each tool run re-inserted as a fixed, escaped
        ` <result>\\n…\\n</result>` block (`rewards.result_block`), never decoded from the completion as a whole,
        so no tool output can close its block and pass for the model's text (`rewards.model_text`)."""
        parts = []
        for start, end, is_model in model_runs(model_mask):
            run = completion_ids[start:end]
            if is_model:
                parts.append(self.decode(run, skip_special_tokens=True))
            elif start in known_tool_messages:
                parts.extend(result_block(m["content"]) for m in known_tool_messages[start])
            else:
                parts.append(result_block(self._recover_result(run)))
        return [{"role": "assistant", "content": "".join(parts)}]

    def _recover_result(self, run_ids: list[int]) -> str:
        """The (escaped) output of a tool run in a branch's prefix; the whole run's text if it does not fit."""
        text = self.decode(run_ids)  # special tokens kept visible: nothing in a tool run may vanish
        pattern = re.escape(self._result_before) + "(.*)" + re.escape(self._result_after)
        match = re.fullmatch(pattern, text, flags=re.DOTALL)
        return match.group(1) if match else text


MALFORMED_CALL_POLICIES = ("message", "end")
"""What a chat protocol does with a tool call its parser cannot read (`ChatTemplateProtocol(on_malformed=)`)."""


class ChatTemplateProtocol(ToolProtocol):
    """Tool calls in the chat template's own format (Qwen's `<tool_call>{json}</tool_call>`, ...), as TRL does.

    Needs a tokenizer whose chat template renders tool calls and tool messages and which has a response
    parser (`response_template`; TRL's `add_response_schema` sets one for templates it knows). The turn ends at
    the eos token, which must be the end-of-turn token (`<|im_end|>` for ChatML; trl_appo.testing describes the eos trap).

    Args:
        tokenizer: the tool-aware tokenizer.
        chat_template_kwargs: extra `apply_chat_template` arguments (e.g. `enable_thinking`).
        on_malformed: a call the parser cannot read (bad JSON, no name, not an object): "message" (default here:
            the model gets a tool error and another turn) or "end" (GRPOTrainer's behaviour: the turn is text and
            the episode ends; the trainer's default, so a class swap rolls out as GRPOTrainer does).
    """

    def __init__(self, tokenizer: Any, chat_template_kwargs: dict | None = None, on_malformed: str = "message"):
        super().__init__(tokenizer)
        if on_malformed not in MALFORMED_CALL_POLICIES:
            raise ValueError(f"on_malformed must be one of {list(MALFORMED_CALL_POLICIES)}, got {on_malformed!r}")
        self.on_malformed = on_malformed
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        template = getattr(tokenizer, "response_template", None) or {}
        # The marker that opens a call: counting it finds calls the parser could not read (malformed JSON).
        self.call_open = template.get("fields", {}).get("tool_calls", {}).get("open", "<tool_call>")
        self._dummy_prefix: dict[str, tuple[str, list[int]]] = {}
        self._glue: dict[tuple, list[str]] = {}
        self._sentinel = f"@@APPO_{uuid.uuid4().hex}_"

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
            if self.on_malformed == "end":
                return TurnParse(ends_episode=True)
            n_open = max(1, self.decode(run_ids).count(self.call_open))
            error = f"malformed tool call: could not parse it ({type(exc).__name__})"
            return TurnParse(calls=[ToolCall("unknown", {}, error=error) for _ in range(n_open)])
        # A call the parser could not read vanishes from the message (parse_response falls back to text):
        # count the opening markers so the model is told about it instead of the episode silently ending.
        n_open = self.decode(run_ids).count(self.call_open)
        unreadable = n_open > len(calls) or any(c.error and c.error.startswith("malformed") for c in calls)
        if unreadable and self.on_malformed == "end":  # GRPOTrainer: an unreadable call leaves the turn as text
            return TurnParse(ends_episode=True)
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
        dummy at its last eos so the boundary is the end-of-turn token (not eos + newline). The template's glue
        comes from a rendering with sentinel contents; the tool contents are inserted verbatim as untrusted
        pieces (`encode_pieces`), so they never yield a control token.
        """
        name = tool_messages[0]["name"]
        prefix_text, prefix_ids = self._prefix(name)
        glue = self._tool_glue(tuple(m["name"] for m in tool_messages))
        pieces = [(prefix_text + glue[0], True)]
        for message, after in zip(tool_messages, glue[1:], strict=True):
            content = message["content"] if isinstance(message["content"], str) else str(message["content"])
            pieces += [(content, False), (after, True)]
        full = self.encode_pieces(pieces)
        if full[: len(prefix_ids)] != prefix_ids:
            raise ValueError("Unexpected tokenization: the eos-trimmed dummy prefix is not a prefix of the full ids.")
        return full[len(prefix_ids) :]

    def _render_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **self.chat_template_kwargs
        )

    def _prefix(self, name: str) -> tuple[str, list[int]]:
        """The dummy conversation's text up to and including its last eos, and its ids."""
        cached = self._dummy_prefix.get(name)
        if cached is None:
            text = self._render_text(self._dummy(name), add_generation_prompt=False)
            eos = self.tokenizer.eos_token
            cut = text.rfind(eos) if eos else -1
            text = text[: cut + len(eos)] if cut >= 0 else text
            cached = (text, self.encode(text))
            if len(self._dummy_prefix) > 256:  # names are the model's: keep the cache bounded
                self._dummy_prefix.clear()
            self._dummy_prefix[name] = cached
        return cached

    def _tool_glue(self, names: tuple) -> list[str]:
        """The template's text around each tool content (len(names) + 1 pieces), from sentinel contents."""
        glue = self._glue.get(names)
        if glue is None:
            prefix_text, _ = self._prefix(names[0])
            sentinels = [f"{self._sentinel}{i}@@" for i in range(len(names))]
            probe = [{"role": "tool", "name": n, "content": s} for n, s in zip(names, sentinels, strict=True)]
            text = self._render_text(self._dummy(names[0]) + probe, add_generation_prompt=True)
            if not text.startswith(prefix_text):
                raise ValueError("Unexpected rendering: the eos-trimmed dummy prefix is not a prefix of the full text.")
            rest, glue = text[len(prefix_text) :], []
            for s in sentinels:
                if rest.count(s) != 1:
                    raise ValueError(
                        "The chat template does not render a tool message's content verbatim, so tool output cannot "
                        "be kept apart from the template's control tokens; use tool_protocol='tags' or a template "
                        "that prints `message.content` as is."
                    )
                before, rest = rest.split(s)
                glue.append(before)
            glue.append(rest)
            if len(self._glue) > 256:
                self._glue.clear()
            self._glue[names] = glue
        return glue

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
