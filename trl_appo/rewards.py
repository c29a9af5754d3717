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
* The tool bonus counts calls that really ran (the ``executed_tool_calls`` keyword the trainer passes), not tags
  the model typed.

What rewards read as the model's own text: the rollout engine hands them the model's tokens (decoded) with each
tool output re-inserted as a fixed, escaped `` <result>\n…\n</result>`` block (:func:`result_block`), and every
answer and tag reader here works on :func:`model_text`, which drops the inside of those blocks. Tool output can
neither close its block nor contribute an answer, a tag or a ``\boxed{}``.

Time: every reward is linear in the completion's length, and :func:`math_equal` (the only one that calls sympy)
runs in a worker process killed after :data:`MATH_TIMEOUT_SECONDS`, so no reward can hang a training step.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import string
import threading
import time
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
# An option letter: alone (``D``, ``(d)``, ``\text{D}``, ``D.``), in parentheses before text (``(D) Weak``), or a
# capital followed by ``.``, ``:`` or ``)`` before text (``D. Weak Non-Sadism``). Never the first word of a sentence:
# "a guess" and "I am not sure" name no option. Applied to the stripped answer, no nested quantifiers (linear time).
_TEXT_WRAP_RE = re.compile(r"\\text(?:bf)?\{(.*)\}", re.DOTALL)
_CHOICE_PRED_RES = (
    re.compile(r"\(?([A-Za-z])\)?[.:]?"),  # the whole answer (fullmatch)
    re.compile(r"\(([A-Za-z])\)"),
    re.compile(r"(?:([A-Z])[.:)]|([a-z])\))(?:\s|$)"),
)
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


def result_block(content: str) -> str:
    """A tool output as rewards read it: `` <result>\\n…\\n</result>`` with the inside escaped
    (:func:`escape_tool_output`), so :func:`model_text` always drops all of it."""
    return f" <result>\n{escape_tool_output(content)}\n</result>"


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
            parts.append(result_block(inner))
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


def _closing_braces(text: str) -> dict[int, int]:
    """Position of the ``}`` closing each ``{`` (unclosed ones absent), in one pass; ``\\{`` / ``\\}`` do not count."""
    closes: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closes[stack.pop()] = i
        i += 1
    return closes


def last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{…}`` (or ``\fbox{…}``) in ``text``, braces matched; None if none.

    ``\boxed 5`` (no braces) gives ``5``. An unbalanced last box falls back to the previous complete one.
    Linear in the text's length however many boxes it holds.
    """
    closes: dict[int, int] | None = None
    for match in reversed(list(_BOXED_RE.finditer(text))):
        i = match.end()
        if text.startswith("{", i):
            if closes is None:
                closes = _closing_braces(text)
            close = closes.get(i)
            if close is not None:
                return text[i + 1 : close].strip()
        elif text.startswith(" ", i):
            token = text[i:].split(maxsplit=1)
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
    """Number of ``<python>`` and ``<search>`` calls the text shows (tool output ignored).

    Only a fallback for rewards called without ``executed_tool_calls``: in the chat protocol a model can type
    ``<python>…</python>`` in its message without making a call.
    """
    text = model_text(text)
    return {tag: text.count(f"</{tag}>") for tag in TOOL_TAGS}


def executed_tool_calls(num_rows: int, kwargs: Mapping[str, Any]) -> list[Mapping[str, int]] | None:
    """Per row, the number of calls per tool name that the rollout engine really executed, or None if unknown.

    Read from the ``executed_tool_calls`` keyword, which :class:`~trl_appo.APPOTrainer` (and
    :func:`trl_appo.evaluation.evaluate`) pass to reward functions: one ``{tool name: calls}`` mapping per
    completion (``Rollout.executed_tool_calls``: calls that ran, a branch's prefix included; calls refused by a
    limit or as malformed are not counted). Without it the tool bonus falls back to :func:`tool_calls_used`.
    """
    values = kwargs.get("executed_tool_calls")
    if values is None:
        return None
    values = list(values)
    if len(values) != num_rows:
        raise ValueError(f"{len(values)} executed_tool_calls entries for {num_rows} completions")
    return [v if isinstance(v, Mapping) else {} for v in values]


# ----------------------------------------------------------------------------------------------------
# Math equivalence (math-verify)
# ----------------------------------------------------------------------------------------------------

MATH_TIMEOUT_SECONDS = 5
"""Seconds one :func:`math_equal` may take before the answer counts as wrong (a hard bound, on any thread)."""

MAX_MATH_ANSWER_CHARS = 1000
"""Longer predictions are not math answers: scored wrong without parsing."""

MATH_WORKERS = 4
"""At most this many math-verify worker processes (one per thread scoring math at the same time)."""

_WORKER_START_SECONDS = 120.0  # importing sympy + math-verify in a fresh interpreter: ~1-2 s, slower when loaded


def _exponent_spans(s: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the exponent after each ``^`` / ``**``: a ``{…}`` / ``(…)`` group or one token."""
    spans = []
    for match in re.finditer(r"\^|\*\*", s):
        j = match.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "{(":
            depth, k = 0, j
            while k < len(s):
                depth += {"{": 1, "(": 1, "}": -1, ")": -1}.get(s[k], 0)
                k += 1
                if depth == 0:
                    break
            spans.append((j, k))
        else:
            token = re.match(r"[-+]?\s*(?:\\[A-Za-z]+|[\w.]+)", s[j:])
            spans.append((j, j + (token.end() if token else 0)))
    return spans


def math_refusal(prediction: str) -> str | None:
    r"""Why a predicted answer is scored wrong without parsing (None: parse it).

    Cheap checks against inputs that make sympy compute for minutes while holding the GIL: over
    :data:`MAX_MATH_ANSWER_CHARS` characters, brackets nested over 32 deep, a numeric power tower (``9^{9^{9}}``,
    ``9**9**9``), an exponent literal of 7+ digits, a factorial of a 5+ digit number. Symbolic towers (``2^{2^{n}}``)
    pass. Whatever passes is still bounded by the worker's timeout (:func:`math_equal`).
    """
    if len(prediction) > MAX_MATH_ANSWER_CHARS:
        return f"longer than {MAX_MATH_ANSWER_CHARS} characters"
    depth = deepest = 0
    for ch in prediction:
        depth += {"{": 1, "(": 1, "[": 1, "}": -1, ")": -1, "]": -1}.get(ch, 0)
        deepest = max(deepest, depth)
    if deepest > 32:
        return "brackets nested over 32 deep"
    for start, end in _exponent_spans(prediction):
        exponent = prediction[start:end]
        numeric = not re.search(r"[A-Za-z]", re.sub(r"\\(?:left|right|cdot|times)", "", exponent))
        if numeric and re.search(r"\^|\*\*", exponent):
            return "a numeric power tower"
        if numeric and re.match(r"\s*(?:\^|\*\*)", prediction[end:]):
            return "a numeric power tower"
        if re.search(r"\d{7,}", exponent):
            return "an exponent of 7 or more digits"
    if re.search(r"\d{5,}\s*!", prediction):
        return "a factorial of a 5-digit number"
    return None


def _clean_math(s: str) -> str:
    return s.strip().rstrip(",.;").strip()


def _parse_math(s: str, timeout: int | None) -> list[list[Any]]:
    r"""math-verify readings of a bare answer: as ``\boxed{s}`` and as ``$s$``, LaTeX extraction only.

    Empty list when neither reading gives a sympy object (math-verify's plain-string fallback is not math). Only the
    LaTeX extractor is used: math-verify's expression extractor finds a number *somewhere* in free text, so
    ``11 \land 12`` or ``12 \lor x`` read as ``12``.
    """
    from math_verify import LatexExtractionConfig, parse

    readings = []
    for wrapped in (f"\\boxed{{{s}}}", f"${s}$"):
        try:
            parsed = parse(wrapped, extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
        except Exception:  # math-verify raises on some inputs despite raise_on_error=False
            parsed = []
        readings.append(parsed)
    is_math = any(not isinstance(item, str) for reading in readings for item in reading)
    return readings if is_math else []


def _false_constant_equation(parsed: list[Any]) -> bool:
    """Whether a parsed prediction states an equation between two unequal constants (``13 = 12``).

    math-verify compares an equation's right-hand side with a plain gold (``x = 12`` is 12), which would make the
    false statement ``13 = 12`` a right answer for 12.
    """
    import sympy

    for item in parsed:
        if isinstance(item, str) or not isinstance(item, sympy.Basic):
            continue
        for relation in item.atoms(sympy.Eq):
            lhs, rhs = relation.lhs, relation.rhs
            if getattr(lhs, "is_number", False) and getattr(rhs, "is_number", False):
                try:
                    if sympy.Eq(lhs, rhs) is sympy.false:
                        return True
                except Exception:  # noqa: BLE001 - undecidable comparisons are left to math-verify
                    continue
    return False


def _math_equal_unguarded(prediction: str, gold: str, timeout: int | None) -> bool | None:
    from math_verify import verify

    gold_readings = _parse_math(_clean_math(gold), timeout)
    if not gold_readings:
        return None
    pred = _clean_math(prediction)
    if not pred or math_refusal(pred) is not None:
        return False
    pred_readings = _parse_math(pred, timeout)
    if any(_false_constant_equation(reading) for reading in pred_readings):
        return False
    for gold_parsed, pred_parsed in zip(gold_readings, pred_readings):
        if not gold_parsed or not pred_parsed:
            continue
        try:
            if verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
                return True
        except Exception:
            continue
    return False


def _math_worker_main() -> None:
    """A math-verify worker process: one JSON request per stdin line, one JSON answer per stdout line."""
    import resource
    import sys

    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure and timeout
    _math_equal_unguarded("x = 1/2", "0.5", None)  # loads math-verify's parser and sympy's lazy parts before "ready"

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:  # EOF: the trainer is gone
        try:
            request = json.loads(line)
            # The kernel ends this process (SIGXCPU) if one request outlives its CPU budget, so a worker whose
            # trainer died mid-request does not compute a huge power forever (the trainer kills it at the deadline).
            usage = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(usage.ru_utime + usage.ru_stime) + 4 * int(request["timeout"]) + 10
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            budget = budget if hard == resource.RLIM_INFINITY else min(budget, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (budget, hard))
            value = _math_equal_unguarded(request["prediction"], request["gold"], request["timeout"])
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError ...: the answer is wrong, not the worker
            value = False
        out.write(json.dumps({"value": value}).encode() + b"\n")
        out.flush()


class _MathWorker:
    """One worker process running :func:`_math_worker_main`; killed when a request outlives its deadline."""

    def __init__(self) -> None:
        import subprocess
        import sys

        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from trl_appo.rewards import _math_worker_main; _math_worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True,
        )
        self._buffer = b""
        line = self._read_line(time.monotonic() + _WORKER_START_SECONDS)
        if line is None or json.loads(line).get("ready") is not True:
            code = self.kill()
            raise RuntimeError(
                f"the math-verify worker process did not start (exit code {code}); check that `python -c 'import "
                "math_verify, trl_appo.rewards'` works with this interpreter"
            )

    def _read_line(self, deadline: float) -> bytes | None:
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def ask(self, request: dict[str, Any], seconds: float) -> tuple[bool, Any]:
        """``(True, answer)``, or ``(False, None)`` when the worker did not answer within ``seconds`` (it is killed)."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return False, None
        line = self._read_line(time.monotonic() + seconds)
        if line is None:
            return False, None
        return True, json.loads(line)["value"]

    def kill(self) -> int | None:
        self.proc.kill()
        code = self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return code


class _MathPool:
    """Idle workers shared by all threads; a worker that timed out is killed and replaced on demand."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: list[_MathWorker] = []
        self.total = 0
        self.cond = threading.Condition()
        atexit.register(self.close)

    def run(self, request: dict[str, Any], seconds: float) -> tuple[bool, Any]:
        with self.cond:
            while not self.idle and self.total >= self.size:
                self.cond.wait()
            worker = self.idle.pop() if self.idle else None
            if worker is None:
                self.total += 1
        finished = False
        try:
            if worker is None:
                worker = _MathWorker()
            finished, value = worker.ask(request, seconds)
            return finished, value
        finally:
            if not finished and worker is not None:
                worker.kill()
            with self.cond:
                if finished:
                    self.idle.append(worker)
                else:
                    self.total -= 1
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            workers, self.idle = self.idle, []
            self.total -= len(workers)
        for worker in workers:
            worker.kill()


_MATH_POOL = _MathPool(MATH_WORKERS)


def math_equal(prediction: str, gold: str, timeout_seconds: int = MATH_TIMEOUT_SECONDS) -> bool | None:
    r"""Whether ``prediction`` is mathematically equal to ``gold`` (bare answers, no ``\boxed``), via math-verify.

    Both are read as ``\boxed{·}`` and as ``$·$``; the answer is right if either reading verifies. So
    ``12.0`` equals ``12``, ``0.5`` equals ``\frac{1}{2}``, ``-6+3\sqrt{3}`` equals ``3\sqrt{3} - 6``; ``x = 12``
    equals ``12`` but the false statement ``13 = 12`` does not, and ``11 \land 12`` is not read as ``12``.
    Returns None when the gold cannot be parsed at all, False when the prediction is empty, unparseable,
    refused by :func:`math_refusal`, different, or not decided within ``timeout_seconds``.

    The check runs in a worker process (a small pool, shared by all threads, ~0.1 ms of overhead per call), which
    is killed when the time is up: sympy can hold the GIL for minutes on one big-integer power, which no thread or
    signal can interrupt. So the bound holds on any thread. The first call starts a worker (~1-2 s).
    """
    refusal = math_refusal(_clean_math(prediction))  # the worker refuses it too (after reading the gold)
    if refusal is not None:
        _warn_once(f"math_refused:{refusal}", f"math answer refused without parsing ({refusal}); scored as wrong")
    request = {"prediction": prediction, "gold": gold, "timeout": max(1, int(timeout_seconds))}
    finished, value = _MATH_POOL.run(request, timeout_seconds + 1.0)
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
    r"""The option letter an answer names (``D``, ``(d)``, ``D. Weak Non-Sadism``, ``\text{D}``), upper-cased.

    None when the answer is text that merely starts with a letter-word ("a guess", "I am not sure").
    """
    answer = answer.strip()
    wrapped = _TEXT_WRAP_RE.fullmatch(answer)
    if wrapped:
        answer = wrapped.group(1).strip()
    alone, parenthesised, delimited = _CHOICE_PRED_RES
    match = alone.fullmatch(answer) or parenthesised.match(answer) or delimited.match(answer)
    return next(g for g in match.groups() if g).upper() if match else None


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
    executed = executed_tool_calls(len(completions), kwargs)

    def score(i: int, text: str, aliases: list[str]) -> float | None:
        ok, _ = check_format(text)
        if not ok:
            return FORMAT_PENALTY
        value = answer_score(i, extract_answer(text), aliases)
        if value is None:
            return None
        used = executed[i] if executed is not None else tool_calls_used(text)
        if value > 0 and all((used.get(tag) or 0) > 0 for tag in TOOL_TAGS):
            value += TOOL_BONUS
        return value

    return _score_rows(name, completions, kwargs, score)


def format_f1_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    r"""The ARPO/APPO reward (docs/algorithm.md §6): format gate, token F1 of the boxed answer, tool-use bonus.

    Returns per row: −1.0 when :func:`check_format` fails (unpaired think tags, not exactly one answer
    block, a tool call without its result, no ``\boxed{}`` in the answer); otherwise the SQuAD token F1 of
    the boxed answer against the gold (best alias), plus 0.1 when that F1 > 0 and both ``python`` and
    ``search`` were called (so at most 1.1); None where the gold is empty. Only completion text is read,
    never the prompt, and tool output inside ``<result>`` blocks is ignored. Tool use is counted from the
    ``executed_tool_calls`` keyword when given (the trainer gives it: calls that really ran), else from the
    tags in the model's text (:func:`executed_tool_calls`).
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
