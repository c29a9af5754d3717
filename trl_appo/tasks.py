r"""Offline tasks that need tools, seeded, with ``train`` and ``heldout`` splits that never share a question.

Two kinds, in the schema of :mod:`trl_appo.datasets` (``prompt, ground_truth, data_source, ability``):

* ``tool_arith`` (ability ``math``): multi-step integer arithmetic that a small model cannot do in its head:
  products of three multi-digit numbers, sums of four 4-5 digit numbers, ``a*b + c*d``, modular products and
  modular powers. The Python tool solves each in one line.
* ``tool_search`` (ability ``qa``): questions over a document corpus (JSONL with ``id``, ``title``, ``text``;
  default: the shipped ``trl_appo/resources/corpus.jsonl``). A *cloze* question quotes a sentence of a
  document with one informative word (a number or a capitalised word) blanked out; a *title* question quotes
  a phrase of a document and asks for its title. Searching the quoted words finds the document.

Splits: an arithmetic question belongs to ``heldout`` when a hash of its text falls in the held-out fraction;
a search question when a hash of its document's id does (so held-out documents are never seen in training).
Questions are then drawn from a generator seeded by ``(seed, split, kind)``: the same seed gives the same
rows, and the size of one split never changes the other.

A ``tiny`` variant (``tiny_arith``: ``What is 347 * 29?`` with a one-line system prompt) is meant for a
~1M-parameter model warm-started by SFT on :func:`make_sft_transcripts`, whose completions are the ideal
tag-protocol transcript ``<python>print(347*29)</python> <result>\n10063\n</result><answer>\boxed{10063}</answer>``.
Prompts are kept short on purpose: every prompt token costs time on CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets as hf_datasets

from trl_appo.datasets import OUTPUT_FEATURES, TAG_PROTOCOL_SYSTEM_PROMPT, make_prompt

Split = Literal["train", "heldout"]
Protocol = Literal["tag", "chat"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

TINY_SYSTEM_PROMPT = (
    "Compute with <python>code</python>; the output comes back in <result></result>. "
    "Then answer as <answer>\\boxed{number}</answer>."
)
"""One-line tag-protocol prompt for the tiny model (short prompts are cheap on CPU)."""

SHORT_TAG_SYSTEM_PROMPT = (
    "Think in <think></think>. Run code with <python>code</python> and search with <search>query</search>; "
    "results come back in <result></result>. End with <answer>\\boxed{answer}</answer>."
)
"""A compact tag-protocol system prompt for the generated tasks (the paper's full prompt is ~250 tokens)."""

CHAT_SYSTEM_PROMPT = (
    "Use the python and search tools when they help. Put the final answer in \\boxed{} at the end."
)
"""System prompt for the chat-template protocol: tools come as schemas through the chat template, not tags."""

DEFAULT_HELDOUT_FRACTION = 0.3


def default_corpus_path() -> Path:
    """The small offline corpus shipped with the package (``trl_appo/resources/corpus.jsonl``)."""
    return Path(__file__).resolve().parent / "resources" / "corpus.jsonl"


def load_corpus(path: str | Path | None = None) -> list[dict[str, str]]:
    """Documents of a JSONL corpus (``id``, ``title``, ``text`` per line); default: the shipped corpus."""
    path = Path(path) if path is not None else default_corpus_path()
    docs = []
    with path.open() as f:
        for number, line in enumerate(f):
            if line.strip():
                doc = json.loads(line)
                docs.append({"id": str(doc.get("id", number)), "title": doc.get("title", ""), "text": doc["text"]})
    return docs


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(key: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Split:
    """The split a question (or document id) belongs to, by a stable hash; independent of seed and sizes."""
    return "heldout" if _hash_fraction(key) < heldout_fraction else "train"


@dataclass(frozen=True)
class Task:
    """One generated question: ``code`` is a Python one-liner printing the answer (arithmetic), else None."""

    question: str
    answer: str
    kind: str
    code: str | None = None
    key: str = ""  # what decides the split (the question, or the document id)


# ----------------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------------


def _arith_task(rng: random.Random) -> Task:
    form = rng.choice(("product", "sum", "products_sum", "mod_product", "mod_power"))
    r = rng.randint
    if form == "product":
        a, b, c = r(100, 999), r(12, 99), r(12, 99)
        expr = f"{a} * {b} * {c}"
        question, value = f"What is {expr}?", a * b * c
    elif form == "sum":
        terms = [r(1000, 99999) for _ in range(4)]
        signs = [rng.choice("+-") for _ in range(3)]
        expr = str(terms[0]) + "".join(f" {s} {t}" for s, t in zip(signs, terms[1:]))
        value = terms[0] + sum(t if s == "+" else -t for s, t in zip(signs, terms[1:]))
        question = f"What is {expr}?"
    elif form == "products_sum":
        a, b, c, d = r(100, 999), r(12, 99), r(100, 999), r(12, 99)
        expr = f"{a} * {b} + {c} * {d}"
        question, value = f"What is {expr}?", a * b + c * d
    elif form == "mod_product":
        a, b, m = r(1000, 99999), r(1000, 9999), r(7, 997)
        expr = f"({a} * {b}) % {m}"
        question, value = f"What is {a} * {b} mod {m}?", (a * b) % m
    else:
        a, e, m = r(2, 99), r(20, 400), r(11, 9973)
        expr = f"pow({a}, {e}, {m})"
        question, value = f"What is {a}^{e} mod {m}?", pow(a, e, m)
    return Task(question, str(value), "tool_arith", code=f"print({expr})", key=question)


def _tiny_arith_task(rng: random.Random) -> Task:
    a, b = rng.randint(100, 999), rng.randint(12, 99)
    question = f"What is {a} * {b}?"
    return Task(question, str(a * b), "tiny_arith", code=f"print({a}*{b})", key=question)


def _draw(
    make: Callable[[random.Random], Task],
    n: int,
    split: Split,
    seed: int,
    heldout_fraction: float,
    max_tries_per_row: int = 200,
) -> list[Task]:
    """``n`` distinct tasks of ``split`` from ``make``, seeded by ``(seed, split, kind)``."""
    rng = random.Random(f"{seed}:{split}:{make.__name__}")
    tasks: dict[str, Task] = {}
    for _ in range(max(n, 1) * max_tries_per_row):
        if len(tasks) >= n:
            break
        task = make(rng)
        if split_of(task.key, heldout_fraction) == split:
            tasks.setdefault(task.question, task)
    if len(tasks) < n:
        raise ValueError(f"only {len(tasks)} distinct {split} questions from {make.__name__}, asked for {n}")
    return list(tasks.values())


def arith_tasks(n: int, split: Split = "train", seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[Task]:
    """``n`` multi-step arithmetic tasks of ``split`` (see the module docstring)."""
    return _draw(_arith_task, n, split, seed, heldout_fraction)


def tiny_arith_tasks(n: int, split: Split = "train", seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[Task]:
    """``n`` tiny tasks ``What is a * b?`` (3-digit times 2-digit) of ``split``."""
    return _draw(_tiny_arith_task, n, split, seed, heldout_fraction)


# ----------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------

_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9,'-]*")


def _cloze_tasks(doc: Mapping[str, str]) -> list[Task]:
    """One cloze per informative word (a number, or a capitalised word past the sentence start)."""
    tasks = []
    title_words = {w.lower() for w in _WORD_RE.findall(doc.get("title", ""))}
    for sentence in _SENTENCE_RE.split(doc["text"].strip()):
        words = list(_WORD_RE.finditer(sentence))
        if len(words) < 5:
            continue
        for position, match in enumerate(words):
            word = match.group().rstrip(",'")
            informative = any(ch.isdigit() for ch in word) or (position > 0 and word[:1].isupper())
            if not informative or word.lower() in title_words or len(word) < 2:
                continue
            blanked = sentence[: match.start()] + "___" + sentence[match.start() + len(word) :]
            question = f'Fill in the blank using search: "{blanked}"'
            tasks.append(Task(question, word, "tool_search", key=doc["id"]))
    return tasks


def _title_tasks(doc: Mapping[str, str], span: int = 6) -> list[Task]:
    """Quote a phrase of the document (title words excluded) and ask for the document's title."""
    title = doc.get("title", "").strip()
    if not title:
        return []
    title_words = {w.lower() for w in _WORD_RE.findall(title)}
    words = doc["text"].split()
    tasks = []
    for start in range(0, max(len(words) - span + 1, 0), span):
        phrase = " ".join(words[start : start + span]).strip(" .,;")
        if any(w.lower() in title_words for w in _WORD_RE.findall(phrase)):
            continue
        question = f'Which corpus entry says "{phrase}"? Give its title.'
        tasks.append(Task(question, title, "tool_search", key=doc["id"]))
    return tasks


def search_task_pool(
    docs: Sequence[Mapping[str, str]], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> dict[Split, list[Task]]:
    """Every search question the corpus gives, per split (by document id); a question text that two
    documents in different splits would both produce is dropped from both, so the splits never share one."""
    pool: dict[Split, dict[str, Task]] = {"train": {}, "heldout": {}}
    for doc in docs:
        split = split_of(str(doc["id"]), heldout_fraction)
        for task in _cloze_tasks(doc) + _title_tasks(doc):
            pool[split].setdefault(task.question, task)
    shared = pool["train"].keys() & pool["heldout"].keys()
    return {split: [t for q, t in questions.items() if q not in shared] for split, questions in pool.items()}


def search_tasks(
    n: int,
    split: Split = "train",
    seed: int = 0,
    docs: Sequence[Mapping[str, str]] | None = None,
    corpus_path: str | Path | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[Task]:
    """``n`` search questions of ``split`` over ``docs`` (default: the corpus at ``corpus_path`` or the shipped one).

    Raises ValueError when the corpus gives fewer than ``n`` questions for that split.
    """
    docs = docs if docs is not None else load_corpus(corpus_path)
    pool = search_task_pool(docs, heldout_fraction)[split]
    if len(pool) < n:
        raise ValueError(f"the corpus ({len(docs)} docs) gives only {len(pool)} {split} search questions, asked for {n}")
    return random.Random(f"{seed}:{split}:search").sample(pool, n)


# ----------------------------------------------------------------------------------------------------
# Rows and datasets
# ----------------------------------------------------------------------------------------------------


def system_prompt_for(protocol: Protocol = "tag", tiny: bool = False, full: bool = False) -> str:
    """System prompt for a protocol: ``tag`` (short tag prompt, tiny one-liner, or the paper's full prompt
    with ``full``) or ``chat`` (tools come as schemas through the chat template)."""
    if protocol == "chat":
        return CHAT_SYSTEM_PROMPT
    if protocol != "tag":
        raise ValueError(f"unknown protocol {protocol!r}; expected 'tag' or 'chat'")
    if tiny:
        return TINY_SYSTEM_PROMPT
    return TAG_PROTOCOL_SYSTEM_PROMPT if full else SHORT_TAG_SYSTEM_PROMPT


def tasks_to_dataset(tasks: Sequence[Task], system_prompt: str | None) -> hf_datasets.Dataset:
    """Tasks as rows of ``prompt, ground_truth, data_source, ability`` (``ability``: math for arithmetic, else qa)."""
    return hf_datasets.Dataset.from_dict(
        {
            "prompt": [make_prompt(t.question, system_prompt) for t in tasks],
            "ground_truth": [t.answer for t in tasks],
            "data_source": [t.kind for t in tasks],
            "ability": ["qa" if t.kind == "tool_search" else "math" for t in tasks],
        },
        features=OUTPUT_FEATURES,
    )


def make_tool_tasks(
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    kinds: Sequence[str] = ("arith", "search"),
    docs: Sequence[Mapping[str, str]] | None = None,
    corpus_path: str | Path | None = None,
    protocol: Protocol = "tag",
    system_prompt: str | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> hf_datasets.DatasetDict:
    """``DatasetDict(train=..., heldout=...)`` of tool-needing tasks, sizes ``n_train`` / ``n_heldout``.

    ``kinds`` share each split evenly (the first kinds take the remainder), rows shuffled with the seed.
    ``system_prompt`` overrides :func:`system_prompt_for` ``(protocol)``. Search questions come from ``docs``,
    else the corpus at ``corpus_path``, else the shipped corpus.
    """
    unknown = set(kinds) - {"arith", "search"}
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; expected 'arith' and/or 'search'")
    prompt = system_prompt if system_prompt is not None else system_prompt_for(protocol)
    if "search" in kinds and docs is None:
        docs = load_corpus(corpus_path)
    out = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        counts = [n // len(kinds) + (i < n % len(kinds)) for i in range(len(kinds))]
        tasks: list[Task] = []
        for kind, count in zip(kinds, counts):
            if kind == "arith":
                tasks += arith_tasks(count, split, seed, heldout_fraction)
            else:
                tasks += search_tasks(count, split, seed, docs=docs, heldout_fraction=heldout_fraction)
        random.Random(f"{seed}:{split}:mix").shuffle(tasks)
        out[split] = tasks_to_dataset(tasks, prompt)
    return hf_datasets.DatasetDict(out)


def make_tiny_tasks(
    n_train: int, n_heldout: int, seed: int = 0, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> hf_datasets.DatasetDict:
    """``DatasetDict(train=..., heldout=...)`` of ``What is a * b?`` rows with :data:`TINY_SYSTEM_PROMPT`."""
    return hf_datasets.DatasetDict(
        {
            split: tasks_to_dataset(tiny_arith_tasks(n, split, seed, heldout_fraction), TINY_SYSTEM_PROMPT)
            for split, n in (("train", n_train), ("heldout", n_heldout))
        }
    )


def ideal_completion(task: Task) -> str:
    r"""The ideal tag-protocol transcript of an arithmetic task:
    ``<python>CODE</python> <result>\nANSWER\n</result><answer>\boxed{ANSWER}</answer>``.

    The `` <result>\n…\n</result>`` part is what the tag protocol's environment appends (docs/algorithm.md §6).
    """
    if isinstance(task, ChainTask) and task.steps:
        calls = "".join(f"<python>{code}</python> <result>\n{out}\n</result>" for code, out in task.steps)
        return f"{calls}<answer>\\boxed{{{task.answer}}}</answer>"
    if task.code is None:
        raise ValueError(f"no ideal transcript for {task.kind} tasks (their tool output depends on the search backend)")
    return f"<python>{task.code}</python> <result>\n{task.answer}\n</result><answer>\\boxed{{{task.answer}}}</answer>"


def make_sft_transcripts(
    n: int,
    seed: int = 0,
    tiny: bool = True,
    system_prompt: str | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> hf_datasets.Dataset:
    """SFT warm-start rows (``train`` split only, so held-out questions stay unseen): TRL's conversational
    prompt-completion format, ``prompt`` plus ``completion = [{"role": "assistant", "content": ideal}]``, and
    ``ground_truth`` / ``data_source`` / ``ability``.

    ``tiny``: ``What is a * b?`` with :data:`TINY_SYSTEM_PROMPT`; else the multi-step arithmetic tasks with the
    short tag prompt. The same seed gives the same questions as :func:`make_tiny_tasks` / :func:`arith_tasks`.
    The completion contains the tool output; mask it from the loss if the model should not learn to write it.
    """
    tasks = (tiny_arith_tasks if tiny else arith_tasks)(n, "train", seed, heldout_fraction)
    prompt = system_prompt if system_prompt is not None else (TINY_SYSTEM_PROMPT if tiny else SHORT_TAG_SYSTEM_PROMPT)
    rows = tasks_to_dataset(tasks, prompt)
    return rows.add_column(
        "completion", [[{"role": "assistant", "content": ideal_completion(t)}] for t in tasks]
    ).select_columns(["prompt", "completion", "ground_truth", "data_source", "ability"])


# ----------------------------------------------------------------------------------------------------
# Chains of dependent tool calls (the learning benchmark's deep / hard / oracle regimes)
# ----------------------------------------------------------------------------------------------------

CHAIN_SYSTEM_PROMPT = (
    "Apply the operations left to right, one <python>r=...\\nprint(r)</python> call per operation, each on the "
    "previous result. Then answer as <answer>\\boxed{number}</answer>."
)
"""One-line prompt for chain tasks (the tiny model's minimal chat template drops it; kept for real models)."""


@dataclass(frozen=True)
class ChainTask(Task):
    r"""A chain ``3471 *29 +518 -76`` evaluated left to right, one tool call per operation.

    ``steps`` holds ``(code, output)`` per call: ``r=3471*29\nprint(r)`` → ``100659``, ``r=100659+518\nprint(r)``
    → ``101177``: every call after the first copies the previous call's output, so the calls depend on each other.
    """

    steps: tuple[tuple[str, str], ...] = ()


def _chain_task(rng: random.Random, length: int) -> ChainTask:
    value = rng.randint(1000, 9999)
    question, steps = f"{value}", []
    for i in range(length):
        ops = ["*"] if i == 0 else ["+", "*"] + (["-"] if value > 1100 else [])
        if value >= 10**7:
            ops.remove("*")
        op = rng.choice(ops)
        if op == "*":
            x = rng.randint(11, 99)
        else:
            x = rng.randint(100, 99999 if op == "+" else min(99999, value - 1000))
        new = value * x if op == "*" else value + x if op == "+" else value - x
        steps.append((f"r={value}{op}{x}\nprint(r)", str(new)))
        question += f" {op}{x}"
        value = new
    question += " ="
    return ChainTask(question, str(value), "chain_arith", code=None, key=question, steps=tuple(steps))


def chain_tasks(
    n: int,
    split: Split = "train",
    seed: int = 0,
    lengths: Sequence[int] = (6,),
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[ChainTask]:
    """``n`` distinct chain tasks of ``split``; each chain's number of calls is drawn uniformly from ``lengths``.

    The split is decided by a hash of the question, so a question is in one split only whatever ``lengths`` is.
    """
    lengths = tuple(lengths)
    if not lengths or any(k < 1 for k in lengths):
        raise ValueError(f"chain lengths must be >= 1, got {lengths}")

    def make(rng: random.Random) -> ChainTask:
        return _chain_task(rng, rng.choice(lengths))

    make.__name__ = "chain" + "_".join(map(str, lengths))
    return _draw(make, n, split, seed, heldout_fraction)


def make_chain_tasks(
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    lengths: Sequence[int] = (6,),
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> hf_datasets.DatasetDict:
    """``DatasetDict(train=..., heldout=...)`` of chain rows with :data:`CHAIN_SYSTEM_PROMPT`; each row also carries
    its ideal transcript as ``gold_completion`` (for :func:`chain_oracle_criterion`; rewards ignore it)."""

    def rows(tasks: list[ChainTask]) -> hf_datasets.Dataset:
        data = tasks_to_dataset(tasks, CHAIN_SYSTEM_PROMPT)
        return data.add_column("gold_completion", [ideal_completion(t) for t in tasks])

    return hf_datasets.DatasetDict(
        {split: rows(chain_tasks(n, split, seed, lengths, heldout_fraction))
         for split, n in (("train", n_train), ("heldout", n_heldout))}
    )


def chain_sft_transcripts(
    n: int, seed: int = 0, lengths: Sequence[int] = (6,), heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> hf_datasets.Dataset:
    """SFT rows (``train`` split only) of chain tasks with their ideal transcripts; see :func:`make_sft_transcripts`."""
    tasks = chain_tasks(n, "train", seed, lengths, heldout_fraction)
    rows = tasks_to_dataset(tasks, CHAIN_SYSTEM_PROMPT)
    return rows.add_column(
        "completion", [[{"role": "assistant", "content": ideal_completion(t)}] for t in tasks]
    ).select_columns(["prompt", "completion", "ground_truth", "data_source", "ability"])


def first_wrong_token(tokenizer, completion_ids: Sequence[int], model_mask: Sequence[int], gold: str) -> int | None:
    r"""Index in ``completion_ids`` of a rollout's first wrong model token, judged against the gold transcript.

    ``gold`` is the ideal completion text (:func:`ideal_completion`, ending with the tokenizer's eos text when the
    rollout is expected to stop there). With a deterministic tool, a rollout that has followed the gold so far also
    received the gold's tool outputs, so the first place where its text leaves the gold is a token the model wrote:
    the returned index ``i`` is the first model token (``model_mask[i] == 1``) after which the decoded completion is
    no longer a prefix of ``gold``. Branching at ``i`` (keep ``completion_ids[:i]``, re-decide token ``i``) is the
    oracle branch point. Returns None when the rollout never leaves the gold (it is correct, or was cut off while
    still on it). Text is compared, not ids, so a different tokenisation of the same text is not an error.
    """
    if len(completion_ids) != len(model_mask):
        raise ValueError(f"completion_ids ({len(completion_ids)}) and model_mask ({len(model_mask)}) differ in length")
    ids = list(completion_ids)
    for i, m in enumerate(model_mask):
        if not gold.startswith(tokenizer.decode(ids[: i + 1])):
            if not m:  # cannot happen with a deterministic tool; a sign that `gold` is not this task's transcript
                raise ValueError(f"the rollout leaves the gold at tool token {i}: is `gold` this task's transcript?")
            return i
    return None


def oracle_hints(context) -> list[int | None]:
    """Per root of a ``core.BranchContext``, the branch position that re-decides its first wrong model token
    (:func:`first_wrong_token` against the row's ``gold_completion`` plus the tokenizer's eos text): the token
    before it when branches keep their chosen token, the token itself when they re-decide it. None where the row
    has no ``gold_completion``, the rollout never left the gold, or the first token is already wrong under
    ``keep_token`` (nothing right to keep)."""
    tok = context.tokenizer
    hints: list[int | None] = []
    for ids, mask, row in zip(context.completion_ids, context.model_mask, context.inputs, strict=True):
        gold = row.get("gold_completion") if isinstance(row, Mapping) else None
        i = None
        if gold is not None:
            try:
                i = first_wrong_token(tok, ids, mask, gold + (tok.eos_token or ""))
            except ValueError:  # left the gold on a tool token: not this row's transcript; no hint
                i = None
        if i is not None and context.keep_token:
            i = i - 1 if i >= 1 else None
        hints.append(i)
    return hints


def chain_oracle_criterion(scores, entropy_key, candidates, generator, *, context):
    """Branch criterion (register it with ``core.register_branch_criterion(name, needs_context=True)``): each
    failed root branches at its first wrong token (:func:`oracle_hints`), the nearest candidate when that token is
    not one; roots without one (correct, or no gold) branch at random candidates."""
    from trl_appo import core

    return core.hint_ranking(oracle_hints(context), candidates, generator)
