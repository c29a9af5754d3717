r"""Reward functions with TRL's signature: ``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]``.

This module owns answer extraction, answer normalisation and scoring; nothing here knows about models,
tokenizers or the trainer. Every function takes the completions TRL hands to reward functions:
conversational completions (a list of messages per row) or standard ones (a string per row).

Gold answers are read, per row, from the first of these keyword columns that is present:
``ground_truth`` (our loaders' column), ``reward_model`` (the ARPO/APPO parquet's dict column,
``{"ground_truth": ...}``), ``solution`` (TRL's own reward functions' column). A gold may be a string,
a number, or a list of accepted aliases (the best alias counts). A row whose gold is empty or
whitespace cannot be scored: its reward is ``None`` (TRL turns it into NaN) and a warning is logged once.

Rewards (docs/algorithm.md §6):

* :func:`format_f1_reward` — the ARPO/APPO reward: −1 on bad tag format, else token-F1 of the boxed
  answer against the gold (SQuAD normalisation), +0.1 when F1 > 0 and both ``<python>`` and
  ``<search>`` were used.
* :func:`format_answer_type_reward` — the same format gate and tool bonus, with the answer scored by
  :func:`answer_type_reward` instead of F1 (the paper's F1 is wrong for math: "12.0" vs "12").
* :func:`exact_match_reward`, :func:`f1_reward` — SQuAD exact match / token F1 of :func:`extract_answer`.
* :func:`math_equivalence_reward` — symbolic equivalence through ``math-verify``.
* :func:`answer_type_reward` — per row: math equivalence, multiple-choice letter match, or F1.

Deviations from the public ARPO release, on purpose:

* Tags are counted in *model-generated* text only. The prompt is never seen (the release's system prompt
  itself contains ``</search>`` and ``</python>``), and the inside of ``<result>…</result>`` blocks is
  tool output, so tags that a search snippet happens to contain are ignored too.
* A tool call counts as answered only when its ``<result>`` block follows it, closed, before the next
  call or the answer; the release only checked the order of the first matching tags.
* ``\boxed{…}`` is extracted with brace matching (``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``).
"""

from __future__ import annotations

import json
import logging
import re
import string
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

TOOL_TAGS = ("python", "search")
"""Tool-call tags of the paper's protocol; the environment answers each with a ``<result>`` block."""

TOOL_BONUS = 0.1
"""Added to a positive F1 when both tools were used (docs/algorithm.md §6)."""

FORMAT_PENALTY = -1.0
"""Reward of a completion whose tag format is wrong (docs/algorithm.md §6)."""

MATH_DATA_SOURCES = frozenset(
    {
        "gsm8k", "openai/gsm8k", "math", "math500", "math-500", "hendrycks_math", "competition_math",
        "lighteval/math", "aime", "aime24", "aime2024", "aime25", "aime2025", "amc", "amc23",
        "olympiadbench", "minerva_math", "svamp", "asdiv", "mawps", "tabmwp", "gsm_symbolic",
        "numina_math", "deepscaler", "tool_arith", "tiny_arith",
    }
)
"""``data_source`` values (lower-cased) that :func:`answer_type_reward` scores by math equivalence."""

AnswerType = Literal["math", "choice", "qa"]

_TAG_RE = re.compile(r"<(/?)(think|search|python|result|answer)>")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_CHOICE_GOLD_RE = re.compile(r"^\(?([A-Z])\)?\.?$")
_CHOICE_PRED_RE = re.compile(r"^\s*(?:\\text\{)?\(?([A-Za-z])\)?(?:\}|[.:)\s]|$)")
_NUMBER_RE = re.compile(r"^\s*\$?\s*[-+]?(?:\d[\d,]*)?\.?\d+\s*(?:\\?%)?\s*\$?\s*$")
_LATEX_MATH_RE = re.compile(r"\\(?:d?frac|sqrt|pi|cdot|times|infty|pm|circ|log|ln|sin|cos|tan|binom)\b|\^|_\{")

_PUNCTUATION = frozenset(string.punctuation)
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


# ----------------------------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------------------------


def _tool_call_tag(call: Mapping[str, Any]) -> str | None:
    """A chat-template tool call to ``python``/``search`` as the tag protocol's ``<name>body</name>``."""
    function = call.get("function", call)
    name = function.get("name")
    if name not in TOOL_TAGS:
        return None
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if isinstance(arguments, Mapping) and len(arguments) == 1 and isinstance(next(iter(arguments.values())), str):
        arguments = next(iter(arguments.values()))
    body = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return f"<{name}>{body}</{name}>"


def escape_tool_output(text: str) -> str:
    r"""Tool output made unable to open or close a ``<result>`` block: ``<result>`` → ``<\result>``,
    ``</result>`` → ``<\/result>``.

    The environment wraps every tool output in ``<result>…</result>``; :func:`model_text` drops the inside of
    that block. Without escaping, an output containing ``</result><answer>\boxed{42}</answer>`` would close
    the block early and its answer would be read as the model's own text. The protocols escape outputs when
    they append them, and :func:`completion_to_text` escapes tool messages.
    """
    return text.replace("<result>", "<\\result>").replace("</result>", "<\\/result>")


def completion_to_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The completion as one tag-protocol string.

    A standard completion is returned as is. A conversational one is the concatenation of its messages'
    contents, so the engine's single-message tag-protocol completions read unchanged, and chat-template
    completions read as the tag protocol: an assistant ``tool_calls`` entry for ``python``/``search`` becomes
    ``<python>code</python>`` / ``<search>query</search>``, and a ``tool`` message becomes
    `` <result>\n…\n</result>`` (the inside escaped by :func:`escape_tool_output`, so tool output cannot close
    the block). Calls to, and output of, other tools are left out.
    """
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        if not isinstance(content, str):  # multimodal content blocks
            content = "".join(block.get("text", "") for block in content if isinstance(block, Mapping))
        if message.get("role") == "tool":
            if message.get("name") not in (None, *TOOL_TAGS):
                continue
            inner = content.strip()
            if inner.startswith("<result>") and inner.endswith("</result>"):  # already wrapped: escape the inside
                inner = inner[len("<result>") : -len("</result>")].strip("\n")
            else:
                inner = content
            parts.append(f" <result>\n{escape_tool_output(inner)}\n</result>")
            continue
        parts.append(content)
        parts.extend(tag for call in message.get("tool_calls") or [] if (tag := _tool_call_tag(call)) is not None)
    return "".join(parts)


def model_text(text: str) -> str:
    """``text`` with the inside of every ``<result>…</result>`` block removed (tool output is not the model's).

    An unclosed ``<result>`` swallows the rest of the text, as the environment's output would.
    """
    out, pos = [], 0
    while True:
        start = text.find("<result>", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos : start + len("<result>")])
        end = text.find("</result>", start)
        if end < 0:
            return "".join(out)
        pos = end


def _match_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``; escaped ``\\{`` / ``\\}`` do not count."""
    depth, i = 0, open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{…}`` (or ``\fbox{…}``) in ``text``, braces matched; None if none.

    ``\boxed 5`` (no braces) gives ``5``. An unbalanced last box falls back to the previous complete one.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        i = match.end()
        if text.startswith("{", i):
            close = _match_brace(text, i)
            if close is not None:
                return text[i + 1 : close].strip()
        elif text.startswith(" ", i):
            token = text[i:].split()
            if token:
                return token[0].rstrip("$").strip()
    return None


def extract_answer(completion: str | Sequence[dict[str, Any]]) -> str:
    r"""The final answer of a completion, tool output ignored.

    Order: (1) the last ``\boxed{}`` inside the last ``<answer>`` block, (2) the last ``\boxed{}`` anywhere,
    (3) the stripped content of the last ``<answer>`` block, (4) the last non-empty line with tags removed.
    Returns "" when the completion has no text.
    """
    text = model_text(completion_to_text(completion))
    blocks = _ANSWER_BLOCK_RE.findall(text)
    if blocks:
        boxed = last_boxed(blocks[-1])
        if boxed is not None:
            return boxed
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if blocks and blocks[-1].strip():
        return blocks[-1].strip()
    lines = [line.strip() for line in _TAG_RE.sub(" ", text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token-level F1 between two answers after :func:`normalize_answer`; 0.0 when either is empty."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the two answers are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


# ----------------------------------------------------------------------------------------------------
# Format of the tag protocol (docs/algorithm.md §6)
# ----------------------------------------------------------------------------------------------------


def check_format(text: str) -> tuple[bool, str]:
    r"""Whether a completion follows the paper's tag protocol; returns ``(ok, reason)``.

    Bad format: unpaired or mis-nested ``<think>`` tags; not exactly one ``<answer>…</answer>`` block; a
    ``<python>``/``<search>`` call that is unclosed or not followed by its closed ``<result>`` block before
    the next call or the answer; a ``<result>`` with no call before it; no ``\boxed{}`` in the answer.
    Tags inside ``<result>`` blocks (tool output) are ignored.
    """
    text = model_text(text)
    think_open = False
    answers = 0
    answer_open = False
    pending_call: str | None = None  # call closed, waiting for its result
    open_call: str | None = None
    answer_content = ""
    answer_start = 0
    for match in _TAG_RE.finditer(text):
        closing, tag = match.group(1) == "/", match.group(2)
        if open_call is not None and not (closing and tag == open_call):
            return False, f"<{open_call}> is not closed before <{match.group(1)}{tag}>"
        if tag == "think":
            if closing != think_open:
                return False, "unpaired <think> tags"
            think_open = not closing
        elif tag in TOOL_TAGS:
            if closing:
                if open_call != tag:
                    return False, f"</{tag}> without <{tag}>"
                open_call, pending_call = None, tag
            else:
                if pending_call is not None:
                    return False, f"<{pending_call}> call without its <result>"
                open_call = tag
        elif tag == "result":
            if closing:  # closes of real blocks follow their opener directly (model_text); stray ones are ignored
                continue
            if pending_call is None:
                return False, "<result> without a tool call"
            if text.find("</result>", match.end()) < 0:
                return False, f"<{pending_call}> result is not closed"
            pending_call = None
        elif tag == "answer":
            if pending_call is not None:
                return False, f"<{pending_call}> call without its <result>"
            if closing:
                if not answer_open:
                    return False, "</answer> without <answer>"
                answer_open = False
                answer_content = text[answer_start : match.start()]
            else:
                answers += 1
                answer_open = True
                answer_start = match.end()
    if open_call is not None:
        return False, f"<{open_call}> is not closed"
    if pending_call is not None:
        return False, f"<{pending_call}> call without its <result>"
    if think_open:
        return False, "unpaired <think> tags"
    if answers != 1 or answer_open or text.count("</answer>") != 1:
        return False, f"expected exactly one <answer>…</answer> block, found {answers}"
    if last_boxed(answer_content) is None:
        return False, "no \\boxed{} in the answer"
    return True, "ok"


def tool_calls_used(text: str) -> dict[str, int]:
    """Number of ``<python>`` and ``<search>`` calls the model made (tool output ignored)."""
    text = model_text(text)
    return {tag: text.count(f"</{tag}>") for tag in TOOL_TAGS}


# ----------------------------------------------------------------------------------------------------
# Math equivalence (math-verify)
# ----------------------------------------------------------------------------------------------------

MATH_TIMEOUT_SECONDS = 5
"""Seconds math-verify may spend on one parse or comparison before the answer counts as wrong."""


def _call_with_timeout(fn: Callable[[int | None], Any], seconds: int) -> tuple[bool, Any]:
    """Run ``fn(timeout)`` guarded by a timeout; returns ``(finished, value)``.

    math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; TRL calls async
    reward functions (and some users call rewards) from other threads. There we switch math-verify's timeout
    off and wait for a daemon helper thread instead: a runaway sympy computation then keeps running in the
    background until it ends, but the reward call returns.
    """
    if threading.current_thread() is threading.main_thread():
        return True, fn(seconds)
    for name in ("math_verify.parser", "math_verify.grader"):  # "timeout is disabled": we time out here
        logging.getLogger(name).setLevel(logging.ERROR)
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(fn(None)), daemon=True)
    worker.start()
    worker.join(seconds)
    return (True, box[0]) if box else (False, None)


def _clean_math(s: str) -> str:
    return s.strip().rstrip(",.;").strip()


def _parse_math(s: str, timeout: int | None) -> list[list[Any]]:
    """math-verify readings of a bare answer: as ``\\boxed{s}`` and as ``$s$``.

    Empty list when neither reading gives a sympy object (math-verify's plain-string fallback is not math).
    """
    from math_verify import parse

    readings = []
    for wrapped in (f"\\boxed{{{s}}}", f"${s}$"):
        try:
            parsed = parse(wrapped, parsing_timeout=timeout)
        except Exception:  # math-verify raises on some inputs despite raise_on_error=False
            parsed = []
        readings.append(parsed)
    is_math = any(not isinstance(item, str) for reading in readings for item in reading)
    return readings if is_math else []


def _math_equal_unguarded(prediction: str, gold: str, timeout: int | None) -> bool | None:
    from math_verify import verify

    gold_readings = _parse_math(_clean_math(gold), timeout)
    if not gold_readings:
        return None
    pred = _clean_math(prediction)
    if not pred:
        return False
    pred_readings = _parse_math(pred, timeout)
    for gold_parsed, pred_parsed in zip(gold_readings, pred_readings):
        if not gold_parsed or not pred_parsed:
            continue
        try:
            if verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
                return True
        except Exception:
            continue
    return False


def math_equal(prediction: str, gold: str, timeout_seconds: int = MATH_TIMEOUT_SECONDS) -> bool | None:
    r"""Whether ``prediction`` is mathematically equal to ``gold`` (bare answers, no ``\boxed``), via math-verify.

    Both are read as ``\boxed{·}`` and as ``$·$``; the answer is right if either reading verifies. So
    ``12.0`` equals ``12``, ``0.5`` equals ``\frac{1}{2}``, ``-6+3\sqrt{3}`` equals ``3\sqrt{3} - 6``.
    Returns None when the gold cannot be parsed at all, False when the prediction is empty, unparseable,
    different, or math-verify timed out or failed. Works off the main thread (see ``_call_with_timeout``).
    """
    finished, value = _call_with_timeout(lambda t: _math_equal_unguarded(prediction, gold, t), timeout_seconds)
    if not finished:
        _warn_once("math_timeout", f"math-verify timed out after {timeout_seconds}s (gold {gold!r}); scored as wrong")
        return False
    return value


# ----------------------------------------------------------------------------------------------------
# Row plumbing
# ----------------------------------------------------------------------------------------------------


def _as_aliases(gold: Any) -> list[str]:
    if gold is None:
        return []
    if isinstance(gold, str):
        return [gold] if gold.strip() else []
    if isinstance(gold, dict):  # e.g. a reward_model dict passed as ground_truth
        return _as_aliases(gold.get("ground_truth"))
    if isinstance(gold, (int, float)):
        return [str(gold)]
    try:
        return [alias for item in gold for alias in _as_aliases(item)]
    except TypeError:
        return [str(gold)]


def gold_answers(num_rows: int, kwargs: dict[str, Any]) -> list[list[str]]:
    """Per-row accepted gold answers from ``ground_truth``, ``reward_model[...]["ground_truth"]`` or ``solution``.

    Raises ValueError when none of those columns is present (a configuration error, not a row problem).
    A row with an empty gold gets an empty list.
    """
    if kwargs.get("ground_truth") is not None:
        golds = list(kwargs["ground_truth"])
    elif kwargs.get("reward_model") is not None:
        golds = [rm.get("ground_truth") if isinstance(rm, dict) else rm for rm in kwargs["reward_model"]]
    elif kwargs.get("solution") is not None:
        golds = list(kwargs["solution"])
    else:
        raise ValueError(
            "No gold answers: the dataset needs a `ground_truth` column (or the ARPO `reward_model` dict column "
            "with a `ground_truth` key, or a `solution` column); got columns "
            f"{sorted(k for k in kwargs if k not in ('trainer_state', 'log_extra', 'log_metric'))}."
        )
    if len(golds) != num_rows:
        raise ValueError(f"{len(golds)} gold answers for {num_rows} completions")
    return [_as_aliases(g) for g in golds]


def _score_rows(
    name: str,
    completions: Sequence[Any],
    kwargs: dict[str, Any],
    score: Callable[[int, str, list[str]], float | None],
) -> list[float | None]:
    """Apply ``score(row, completion_text, aliases)`` per row; rows without a gold get None (warned once)."""
    golds = gold_answers(len(completions), kwargs)
    rewards: list[float | None] = []
    for i, (completion, aliases) in enumerate(zip(completions, golds)):
        if not aliases:
            _warn_once(f"empty_gold:{name}", f"{name}: empty gold answer; such rows get reward None (warned once)")
            rewards.append(None)
            continue
        rewards.append(score(i, completion_to_text(completion), aliases))
    return rewards


# ----------------------------------------------------------------------------------------------------
# Answer-type dispatch
# ----------------------------------------------------------------------------------------------------


def _column(kwargs: dict[str, Any], name: str, i: int) -> Any:
    values = kwargs.get(name)
    return values[i] if values is not None and i < len(values) else None


def answer_type(gold: str, ability: str | None = None, data_source: str | None = None) -> AnswerType:
    """How a row's answer is scored: ``"math"``, ``"choice"`` (a multiple-choice letter) or ``"qa"``.

    Order: ``ability == "math"`` -> math; a single capital letter gold (``D``, ``(D)``, ``D.``) -> choice;
    ``data_source`` in :data:`MATH_DATA_SOURCES` -> math; a gold that is a number or contains LaTeX math
    (``\\frac``, ``\\sqrt``, ``^`` ...) -> math; otherwise qa.
    """
    if (ability or "").lower() == "math":
        return "math"
    if _CHOICE_GOLD_RE.match(gold.strip()):
        return "choice"
    if (data_source or "").lower() in MATH_DATA_SOURCES:
        return "math"
    if _NUMBER_RE.match(gold) or _LATEX_MATH_RE.search(gold):
        return "math"
    return "qa"


def choice_letter(answer: str) -> str | None:
    r"""The option letter an answer names (``D``, ``(d)``, ``D. Weak Non-Sadism``, ``\text{D}``), upper-cased."""
    match = _CHOICE_PRED_RE.match(answer)
    return match.group(1).upper() if match else None


def _score_answer(
    kind: AnswerType, prediction: str, aliases: list[str], text_fallback: bool = True
) -> float | None:
    """Score one extracted answer. A math gold that is not math (``①③``, ``Да``) falls back to exact match
    when ``text_fallback``, else gives None."""
    if kind == "math":
        results = [math_equal(prediction, alias) for alias in aliases]
        if all(r is None for r in results):
            if not text_fallback:
                return None
            return max(exact_match(prediction, alias) for alias in aliases)
        return float(any(results))
    if kind == "choice":
        letter = choice_letter(prediction)
        return float(any(letter == choice_letter(alias.strip()) for alias in aliases))
    return max(token_f1(prediction, alias) for alias in aliases)


def _row_kind(kwargs: dict[str, Any], i: int, aliases: list[str]) -> AnswerType:
    return answer_type(aliases[0], _column(kwargs, "ability", i), _column(kwargs, "data_source", i))


# ----------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)
# ----------------------------------------------------------------------------------------------------


def exact_match_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """SQuAD exact match of :func:`extract_answer` against the gold (best alias).

    Returns per row 1.0 (match) or 0.0 (no match, including no answer at all); None where the gold is empty.
    """
    return _score_rows(
        "exact_match_reward",
        completions,
        kwargs,
        lambda i, text, aliases: max(exact_match(extract_answer(text), a) for a in aliases),
    )


def f1_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """SQuAD token F1 of :func:`extract_answer` against the gold (best alias).

    Returns per row a float in [0, 1] (0.0 when there is no answer); None where the gold is empty.
    """
    return _score_rows(
        "f1_reward",
        completions,
        kwargs,
        lambda i, text, aliases: max(token_f1(extract_answer(text), a) for a in aliases),
    )


def math_equivalence_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    r"""Math equivalence (math-verify) of :func:`extract_answer` against the gold: never string matching.

    Returns per row 1.0 (equal: ``12.0`` vs ``12``, ``0.5`` vs ``\frac{1}{2}``), 0.0 (different, no answer,
    unparseable answer, or math-verify timed out); None where the gold is empty or cannot be parsed as math.
    """

    def score(i: int, text: str, aliases: list[str]) -> float | None:
        return _score_answer("math", extract_answer(text), aliases, text_fallback=False)

    return _score_rows("math_equivalence_reward", completions, kwargs, score)


def answer_type_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """Correctness of :func:`extract_answer`, scored per row by :func:`answer_type`.

    Returns per row: math rows 1.0/0.0 by math equivalence (by exact match if the gold is not math, e.g.
    ``①③``); multiple-choice
    rows 1.0/0.0 by the option letter; other rows token F1 in [0, 1]. None where the gold is empty. Logs the
    chosen type per row as the ``answer_type`` column when TRL passes ``log_extra``.
    """
    kinds: list[str] = []

    def score(i: int, text: str, aliases: list[str]) -> float | None:
        kind = _row_kind(kwargs, i, aliases)
        kinds.append(kind)
        return _score_answer(kind, extract_answer(text), aliases)

    rewards = _score_rows("answer_type_reward", completions, kwargs, score)
    log_extra = kwargs.get("log_extra")
    if log_extra is not None and len(kinds) == len(rewards):
        log_extra("answer_type", kinds)
    return rewards


def _format_gated(
    name: str,
    completions: Sequence[Any],
    kwargs: dict[str, Any],
    answer_score: Callable[[int, str, list[str]], float | None],
) -> list[float | None]:
    def score(i: int, text: str, aliases: list[str]) -> float | None:
        ok, _ = check_format(text)
        if not ok:
            return FORMAT_PENALTY
        value = answer_score(i, extract_answer(text), aliases)
        if value is None:
            return None
        used = tool_calls_used(text)
        if value > 0 and all(used[tag] > 0 for tag in TOOL_TAGS):
            value += TOOL_BONUS
        return value

    return _score_rows(name, completions, kwargs, score)


def format_f1_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    r"""The ARPO/APPO reward (docs/algorithm.md §6): format gate, token F1 of the boxed answer, tool-use bonus.

    Returns per row: −1.0 when :func:`check_format` fails (unpaired think tags, not exactly one answer
    block, a tool call without its result, no ``\boxed{}`` in the answer); otherwise the SQuAD token F1 of
    the boxed answer against the gold (best alias), plus 0.1 when that F1 > 0 and both ``<python>`` and
    ``<search>`` were called (so at most 1.1); None where the gold is empty. Only completion text is read,
    never the prompt, and tool output inside ``<result>`` blocks is ignored.
    """
    return _format_gated(
        "format_f1_reward", completions, kwargs, lambda i, pred, aliases: max(token_f1(pred, a) for a in aliases)
    )


def format_answer_type_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """:func:`format_f1_reward` with the answer scored by :func:`answer_type` (math equivalence for math rows).

    Returns per row: −1.0 on bad format; otherwise the :func:`answer_type_reward` score (+0.1 when positive and
    both tools were used); None where the gold is empty.
    """
    return _format_gated(
        "format_answer_type_reward",
        completions,
        kwargs,
        lambda i, pred, aliases: _score_answer(_row_kind(kwargs, i, aliases), pred, aliases),
    )


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "format_f1": format_f1_reward,
    "format_answer_type": format_answer_type_reward,
    "exact_match": exact_match_reward,
    "f1": f1_reward,
    "math_equivalence": math_equivalence_reward,
    "answer_type": answer_type_reward,
}
"""Reward functions by name (for configs and the CLI)."""
