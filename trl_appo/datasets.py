r"""Data: the ARPO/APPO parquet release and GSM8K / MATH / HotpotQA-style records, as TRL-ready datasets.

Every loader returns a ``datasets.Dataset`` with the same columns, which the reward functions in
:mod:`trl_appo.rewards` read directly:

* ``prompt``: conversational prompt, ``[{"role": "system", ...}, {"role": "user", ...}]``;
* ``ground_truth``: the gold answer, a string;
* ``data_source``: where the row comes from (e.g. ``DR_grpo_mix``, ``gsm8k``);
* ``ability``: ``"math"``, ``"qa"`` or None (unknown; :func:`trl_appo.rewards.answer_type` then infers it).

Deviations from the public release: by default :func:`load_arpo_dataset` repairs an escaping accident in
the release's prompts, where ``\b`` and ``\f`` were read as control characters: ``"\x08oxed"`` becomes
``"\\boxed"`` (twice in every system prompt) and ``"\x0crac{"`` becomes ``"\\frac{"`` (a few user
prompts). Pass ``fix_escapes=False`` for the bytes exactly as released.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets as hf_datasets

TAG_PROTOCOL_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves the given question step by step, using a Wikipedia search tool "
    "and a Python interpreter tool when they help. First think about the reasoning process, then give the "
    "answer. Enclose the reasoning in <think> </think> tags and the answer in <answer> </answer> tags. "
    "To search, write a query as <search> query </search>; to run code, write it as <python> code </python>. "
    "The result of each call is returned to you between <result> and </result> tags. For example: "
    "<think> reasoning </think> <search> search query </search> <result> search result </result> "
    "<think> reasoning </think> <python> python code </python> <result> interpreter output </result> "
    "<think> reasoning </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. "
    "In the answer, put the exact final answer inside \\boxed{} in LaTeX format."
)
"""Our rendering of the paper's tag-protocol system prompt (docs/algorithm.md §6): think / search / python / result /
answer with ``\\boxed{}``. Same instructions and example as the release's prompt, with ``\\boxed`` intact."""

ARPO_COLUMNS = ("prompt", "reward_model", "data_source")
"""Columns :func:`load_arpo_dataset` needs (``ability`` and ``extra_info`` are optional)."""

OUTPUT_COLUMNS = ("prompt", "ground_truth", "data_source", "ability")

OUTPUT_FEATURES = hf_datasets.Features(
    {
        "prompt": hf_datasets.List({"role": hf_datasets.Value("string"), "content": hf_datasets.Value("string")}),
        "ground_truth": hf_datasets.Value("string"),
        "data_source": hf_datasets.Value("string"),
        "ability": hf_datasets.Value("string"),
    }
)
"""Arrow types of every loader's output (``ability`` stays a string column even when all values are None)."""

_ESCAPE_FIXES = (("\x08oxed", "\\boxed"), ("\x0crac{", "\\frac{"))
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def fix_release_escapes(text: str) -> str:
    r"""Undo the release's ``\b`` / ``\f`` escaping accident: ``"\x08oxed"`` -> ``"\\boxed"``, ``"\x0crac{"`` -> ``"\\frac{"``."""
    for broken, fixed in _ESCAPE_FIXES:
        text = text.replace(broken, fixed)
    return text


def make_prompt(question: str, system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """A conversational prompt: the system prompt (if any) and the question as the user message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


# ----------------------------------------------------------------------------------------------------
# ARPO / APPO parquet
# ----------------------------------------------------------------------------------------------------


def _parquet_files(path_or_paths: str | Path | Sequence[str | Path], split: str | None) -> tuple[list[Path], bool]:
    """Files to read, and whether ``split`` still has to filter rows (False when it picked a file)."""
    paths = [Path(path_or_paths)] if isinstance(path_or_paths, (str, Path)) else [Path(p) for p in path_or_paths]
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        if split is None:
            files = sorted(directory.glob("*.parquet"))
        else:
            files = [directory / f"{split}.parquet"] if (directory / f"{split}.parquet").exists() else []
            files = files or sorted(directory.glob(f"{split}*.parquet"))
            if not files:
                raise FileNotFoundError(f"no {split}.parquet (or {split}*.parquet) in {directory}")
            return files, False
        if not files:
            raise FileNotFoundError(f"no .parquet files in {directory}")
        return files, False
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file(s): {missing}")
    return paths, split is not None


def _message_list(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _gold_string(gold: Any) -> str:
    """A gold answer as one string; a list of aliases keeps the first (the release has none)."""
    if gold is None:
        return ""
    if isinstance(gold, str):
        return gold
    if isinstance(gold, Mapping):
        return _gold_string(gold.get("ground_truth"))
    if hasattr(gold, "__len__") and not isinstance(gold, (bytes, bytearray)):
        return _gold_string(gold[0]) if len(gold) else ""
    return str(gold)


def _require_columns(columns: Iterable[str], needed: Sequence[str], source: str, expected: str) -> None:
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing} (has {sorted(columns)}); expected {expected}."
        )


def load_arpo_dataset(
    path_or_paths: str | Path | Sequence[str | Path],
    split: str | None = None,
    limit: int | None = None,
    fix_escapes: bool = True,
) -> hf_datasets.Dataset:
    r"""Load ARPO/APPO parquet files as a TRL-ready dataset with columns ``prompt, ground_truth, data_source, ability``.

    Args:
        path_or_paths: a parquet file, a list of them, or a directory.
        split: with a directory, the file to read (``"valid"`` -> ``valid.parquet``, else ``valid*.parquet``);
            with files, keep only rows whose ``extra_info["split"]`` equals it.
        limit: keep the first ``limit`` rows (after the split filter).
        fix_escapes: repair the release's escaping accident (``"\x08oxed"`` -> ``"\\boxed"``,
            ``"\x0crac{"`` -> ``"\\frac{"``) in every prompt message. On by default.

    The gold comes from ``reward_model["ground_truth"]`` (a plain ``ground_truth`` column is accepted too);
    ``ability`` is None where the file has no such column or value. Raises ValueError naming the missing
    column(s) for files that lack ``prompt``, ``data_source`` or a gold column.
    """
    import pandas as pd

    files, filter_rows = _parquet_files(path_or_paths, split)
    frames = []
    for file in files:
        frame = pd.read_parquet(file)
        gold_column = "reward_model" if "reward_model" in frame.columns else "ground_truth"
        _require_columns(
            frame.columns,
            ("prompt", "data_source", gold_column),
            f"{file}",
            "the ARPO/APPO schema: `prompt` (list of {role, content} messages), `reward_model` (dict with "
            "`ground_truth`) or `ground_truth` (str), `data_source` (str), optional `ability` and `extra_info`",
        )
        if filter_rows:
            if "extra_info" not in frame.columns:
                raise ValueError(f"{file} has no `extra_info` column, so split={split!r} cannot filter its rows")
            keep = [isinstance(info, Mapping) and info.get("split") == split for info in frame["extra_info"]]
            frame = frame[keep]
        frames.append(frame.assign(_gold=frame[gold_column]))
    frame = pd.concat(frames, ignore_index=True)
    if limit is not None:
        frame = frame.iloc[:limit]

    def prompt_of(value: Any) -> list[dict[str, str]]:
        messages = _message_list(value)
        if fix_escapes:
            messages = [{**m, "content": fix_release_escapes(m["content"])} for m in messages]
        return messages

    abilities = frame["ability"] if "ability" in frame.columns else [None] * len(frame)
    return hf_datasets.Dataset.from_dict(
        {
            "prompt": [prompt_of(p) for p in frame["prompt"]],
            "ground_truth": [_gold_string(g) for g in frame["_gold"]],
            "data_source": [None if s is None else str(s) for s in frame["data_source"]],
            "ability": [a if isinstance(a, str) else None for a in abilities],
        },
        features=OUTPUT_FEATURES,
    )


# ----------------------------------------------------------------------------------------------------
# GSM8K / MATH / HotpotQA-style records
# ----------------------------------------------------------------------------------------------------


def gsm8k_final_answer(answer: str) -> str:
    """The final answer after ``####`` in a GSM8K solution, thousands separators removed (``"1,200"`` -> ``"1200"``)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### <final answer>' line: {answer[-80:]!r}")
    final = answer.rsplit("####", 1)[1].strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", final)


def math_final_answer(solution: str) -> str:
    r"""The content of the last ``\boxed{}`` in a MATH solution (nested braces handled)."""
    from trl_appo.rewards import last_boxed

    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[-80:]!r}")
    return boxed


def _hotpot_context(context: Any) -> str:
    """HotpotQA context as text: the hub's ``{"title": [...], "sentences": [[...]]}`` or the original
    ``[[title, [sentences]], ...]``, or already a string."""
    if context is None:
        return ""
    if isinstance(context, str):
        return context
    if isinstance(context, Mapping):
        pairs = zip(context.get("title", []), context.get("sentences", []))
    else:
        pairs = ((item[0], item[1]) for item in context)
    return "\n".join(f"{title}: {''.join(sentences)}" for title, sentences in pairs)


def gsm8k_record(record: Mapping[str, Any], system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT) -> dict[str, Any]:
    """A GSM8K-style record (``question``, ``answer`` ending in ``#### 42``) in our schema."""
    return {
        "prompt": make_prompt(record["question"], system_prompt),
        "ground_truth": gsm8k_final_answer(record["answer"]),
        "data_source": record.get("data_source") or "gsm8k",
        "ability": "math",
    }


def math_record(record: Mapping[str, Any], system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT) -> dict[str, Any]:
    r"""A MATH-style record (``problem``, ``solution`` with ``\boxed{}``; an ``answer`` field wins if present)."""
    answer = record.get("answer")
    return {
        "prompt": make_prompt(record["problem"], system_prompt),
        "ground_truth": str(answer) if answer not in (None, "") else math_final_answer(record["solution"]),
        "data_source": record.get("data_source") or "math",
        "ability": "math",
    }


def hotpotqa_record(
    record: Mapping[str, Any],
    system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT,
    include_context: bool = False,
) -> dict[str, Any]:
    """A HotpotQA-style record (``question``, ``answer``, optional ``context``) in our schema.

    The paper's setting is open-domain (evidence comes from search), so ``context`` is dropped unless
    ``include_context``, which puts it in the user message before the question.
    """
    question = record["question"]
    context = _hotpot_context(record.get("context")) if include_context else ""
    if context:
        question = f"Context:\n{context}\n\nQuestion: {question}"
    return {
        "prompt": make_prompt(question, system_prompt),
        "ground_truth": str(record["answer"]),
        "data_source": record.get("data_source") or "hotpotqa",
        "ability": "qa",
    }


ADAPTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "gsm8k": gsm8k_record,
    "math": math_record,
    "hotpotqa": hotpotqa_record,
}
"""Record adapters by schema name."""

_SCHEMA_HELP = (
    "arpo (`prompt`, `reward_model`/`ground_truth`, `data_source`), gsm8k (`question`, `answer` with '#### x'), "
    "math (`problem`, `solution` with \\boxed{}), hotpotqa (`question`, `answer`, optional `context`)"
)


def detect_schema(columns: Iterable[str], first_record: Mapping[str, Any] | None = None) -> str:
    """``"arpo"``, ``"gsm8k"``, ``"math"`` or ``"hotpotqa"`` from a table's columns (and its first record).

    Raises ValueError listing the schemas it knows when none fits.
    """
    columns = set(columns)
    if "prompt" in columns and ({"reward_model", "ground_truth"} & columns):
        return "arpo"
    if {"problem", "solution"} <= columns or {"problem", "answer"} <= columns:
        return "math"
    if {"question", "answer"} <= columns:
        answer = str((first_record or {}).get("answer", ""))
        return "gsm8k" if "####" in answer else "hotpotqa"
    raise ValueError(f"cannot tell the schema of a table with columns {sorted(columns)}; expected one of: {_SCHEMA_HELP}")


def _read_local(path: Path) -> hf_datasets.Dataset:
    kind = _LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"unsupported file type {path.suffix!r} for {path}; use .jsonl, .json, .parquet or .csv")
    if path.suffix.lower() == ".json":
        with path.open() as f:
            if f.read(1024).lstrip().startswith("["):  # a JSON array of records, not JSON lines
                f.seek(0)
                return hf_datasets.Dataset.from_list(json.load(f))
    return hf_datasets.Dataset.from_pandas(_read_frame(path, kind), preserve_index=False)


def _read_frame(path: Path, kind: str):
    import pandas as pd

    if kind == "json":
        return pd.read_json(path, lines=True, dtype=False)
    if kind == "parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def convert_records(
    table: hf_datasets.Dataset,
    schema: str | None = None,
    system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT,
    include_context: bool = False,
) -> hf_datasets.Dataset:
    """A GSM8K / MATH / HotpotQA-style table in our schema (``schema`` None: :func:`detect_schema`)."""
    schema = schema or detect_schema(table.column_names, table[0] if len(table) else None)
    if schema not in ADAPTERS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {sorted(ADAPTERS)}")
    needed = {"gsm8k": ("question", "answer"), "math": ("problem",), "hotpotqa": ("question", "answer")}[schema]
    _require_columns(table.column_names, needed, f"a {schema} table", _SCHEMA_HELP)
    if schema == "math" and not ({"solution", "answer"} & set(table.column_names)):
        raise ValueError(f"a math table needs `solution` or `answer` (has {table.column_names}); expected {_SCHEMA_HELP}")
    kwargs = {"include_context": include_context} if schema == "hotpotqa" else {}
    rows = [ADAPTERS[schema](record, system_prompt, **kwargs) for record in table]
    return hf_datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in OUTPUT_COLUMNS}, features=OUTPUT_FEATURES)


def load_dataset_any(
    name_or_path: str | Path,
    split: str | None = None,
    schema: str | None = None,
    limit: int | None = None,
    system_prompt: str | None = TAG_PROTOCOL_SYSTEM_PROMPT,
    include_context: bool = False,
    **load_kwargs: Any,
) -> hf_datasets.Dataset:
    """Load a local file or a hub dataset in our schema (``prompt, ground_truth, data_source, ability``).

    * An existing directory, or a parquet file with the ARPO columns: :func:`load_arpo_dataset` (``split``
      picks ``<split>.parquet`` in a directory, filters ``extra_info["split"]`` in a file).
    * Other local ``.jsonl``/``.json``/``.parquet``/``.csv`` files: :func:`convert_records`, with ``schema``
      (``"gsm8k"``, ``"math"``, ``"hotpotqa"``) detected from the columns unless given; ``split`` is unused.
    * Anything else is a hub name: ``datasets.load_dataset(name_or_path, split=split or "train", **load_kwargs)``,
      converted the same way. Failing to reach the hub (e.g. offline) raises ConnectionError saying so.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return load_arpo_dataset(path, split=split, limit=limit)
    if path.is_file():
        if path.suffix.lower() == ".parquet" and schema in (None, "arpo") and _is_arpo(path):
            return load_arpo_dataset(path, split=split, limit=limit)
        table = _read_local(path)
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        return convert_records(table, schema, system_prompt, include_context)
    if path.suffix.lower() in _LOCAL_SUFFIXES or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file: {name_or_path}")
    try:
        table = hf_datasets.load_dataset(str(name_or_path), split=split or "train", **load_kwargs)
    except Exception as error:  # offline, unknown name, gated: each surfaces as a different exception type
        raise ConnectionError(
            f"could not load {str(name_or_path)!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no network)? Pass a local .jsonl/.json/"
            ".parquet/.csv file instead."
        ) from error
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return convert_records(table, schema, system_prompt, include_context)


def _is_arpo(path: Path) -> bool:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return "prompt" in names and bool({"reward_model", "ground_truth"} & names)
