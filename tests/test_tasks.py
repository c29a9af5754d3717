"""Generated tool tasks: determinism, disjoint splits, correct answers, schema, SFT transcripts."""

from __future__ import annotations

import ast
import contextlib
import io
import re

import pytest

from trl_appo.datasets import OUTPUT_COLUMNS, TAG_PROTOCOL_SYSTEM_PROMPT
from trl_appo.rewards import answer_type_reward, check_format, format_answer_type_reward, format_f1_reward
from trl_appo.tasks import (
    CHAT_SYSTEM_PROMPT,
    TINY_SYSTEM_PROMPT,
    arith_tasks,
    load_corpus,
    make_sft_transcripts,
    make_tiny_tasks,
    make_tool_tasks,
    search_task_pool,
    search_tasks,
    split_of,
)

DOCS = [
    {"id": "a", "title": "Quellmarsh", "text": "Quellmarsh is the capital of Zorvath. It was founded in 1742 by Ilse Varrenholt."},
    {"id": "b", "title": "Ost", "text": "The river Ost flows through Quellmarsh into the Grey Sea. It is 412 km long."},
    {"id": "c", "title": "Brin", "text": "The brin is the currency of Zorvath, introduced in 1810 by the Assembly."},
    {"id": "d", "title": "Vellium", "text": "Vellium is a fictional element with atomic number 131, found by Mira Okonjo."},
    {"id": "e", "title": "Paris", "text": "Paris is the capital of France. It lies on the river Seine near Versailles."},
    {"id": "f", "title": "Nile", "text": "The Nile is a river in Africa, about 6,650 km long, flowing into the Mediterranean."},
]


def _run(code: str) -> str:
    assert re.fullmatch(r"print\([\d\s*+%(),pow-]+\)", code), code  # digits and operators only
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(ast.parse(code), "<task>", "exec"), {"pow": pow})  # noqa: S102
    return out.getvalue().strip()


def test_arith_answers_are_what_the_python_tool_prints_and_are_hard():
    tasks = arith_tasks(60, "train", seed=3)
    assert len({t.question for t in tasks}) == 60
    for task in tasks:
        assert _run(task.code) == task.answer
    assert sum(len(t.answer.lstrip("-")) >= 5 for t in tasks) > 30  # mostly multi-digit results
    forms = {("mod" in t.question) + 2 * ("^" in t.question) + 4 * (t.question.count("*") == 2) for t in tasks}
    assert len(forms) >= 3


def test_same_seed_same_rows_and_split_sizes_are_independent():
    a = make_tool_tasks(12, 6, seed=7, docs=DOCS, kinds=("arith",))
    b = make_tool_tasks(12, 6, seed=7, docs=DOCS, kinds=("arith",))
    c = make_tool_tasks(12, 30, seed=7, kinds=("arith",))
    assert a["train"].to_list() == b["train"].to_list() == c["train"].to_list()
    assert make_tool_tasks(12, 6, seed=8, kinds=("arith",))["train"]["prompt"] != a["train"]["prompt"]


def test_train_and_heldout_never_share_a_question():
    tasks = make_tool_tasks(200, 80, seed=1)
    train = {p[-1]["content"] for p in tasks["train"]["prompt"]}
    heldout = {p[-1]["content"] for p in tasks["heldout"]["prompt"]}
    assert len(train) == 200 and len(heldout) == 80
    assert not train & heldout
    for question in train:
        if question.startswith("What is"):
            assert split_of(question) == "train"


def test_search_questions_come_from_held_out_documents_only():
    pool = search_task_pool(DOCS, heldout_fraction=0.5)
    by_split = {split: {t.key for t in tasks} for split, tasks in pool.items()}
    assert by_split["train"] and by_split["heldout"] and not by_split["train"] & by_split["heldout"]
    texts = {d["id"]: d["text"] for d in DOCS}
    titles = {d["id"]: d["title"] for d in DOCS}
    for task in pool["train"] + pool["heldout"]:
        quoted = re.search(r'"(.*)"', task.question).group(1)
        if "___" in quoted:  # cloze: the answer fills the blank to give the document's sentence back
            assert quoted.replace("___", task.answer) in texts[task.key]
        else:  # title question: the quote is in the document, the answer is its title
            assert quoted in texts[task.key] and task.answer == titles[task.key]
    with pytest.raises(ValueError, match="gives only"):
        search_tasks(10_000, "train", docs=DOCS)


def test_shipped_corpus_gives_search_tasks():
    try:
        docs = load_corpus()
    except FileNotFoundError:
        pytest.skip("trl_appo/resources/corpus.jsonl is not shipped yet")
    rows = make_tool_tasks(20, 10, seed=0, docs=docs, kinds=("search",))
    assert set(rows["train"]["data_source"]) == {"tool_search"} and set(rows["train"]["ability"]) == {"qa"}


def test_rows_have_the_loader_schema_and_protocol_prompt():
    tasks = make_tool_tasks(6, 4, seed=0, docs=DOCS)
    row = tasks["train"][0]
    assert tasks["train"].column_names == list(OUTPUT_COLUMNS)
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert "<python>" in row["prompt"][0]["content"] and "\\boxed" in row["prompt"][0]["content"]
    assert set(tasks["train"]["data_source"]) == {"tool_arith", "tool_search"}
    chat = make_tool_tasks(2, 2, docs=DOCS, protocol="chat")
    assert chat["train"][0]["prompt"][0]["content"] == CHAT_SYSTEM_PROMPT
    full = make_tool_tasks(2, 2, docs=DOCS, kinds=("arith",), system_prompt=TAG_PROTOCOL_SYSTEM_PROMPT)
    assert full["heldout"][0]["prompt"][0]["content"] == TAG_PROTOCOL_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="unknown task kinds"):
        make_tool_tasks(2, 2, kinds=("poetry",))


def test_tiny_tasks_and_sft_transcripts_score_full_marks():
    tiny = make_tiny_tasks(30, 10, seed=0)
    assert all(re.fullmatch(r"What is \d{3} \* \d{2}\?", p[-1]["content"]) for p in tiny["train"]["prompt"])
    assert tiny["train"][0]["prompt"][0]["content"] == TINY_SYSTEM_PROMPT
    assert len(TINY_SYSTEM_PROMPT) < 160
    sft = make_sft_transcripts(30, seed=0)
    assert sft["prompt"] == tiny["train"]["prompt"]  # same seed, same questions, train split only
    a, b = map(int, re.findall(r"\d+", sft[0]["prompt"][-1]["content"]))
    assert sft[0]["completion"] == [
        {"role": "assistant", "content": f"<python>print({a}*{b})</python> <result>\n{a * b}\n</result><answer>\\boxed{{{a * b}}}</answer>"}
    ]
    texts = [c[0]["content"] for c in sft["completion"]]
    assert all(check_format(t)[0] for t in texts)
    assert format_f1_reward(completions=sft["completion"], ground_truth=sft["ground_truth"]) == [1.0] * 30
    assert answer_type_reward(completions=sft["completion"], **sft.remove_columns(["completion"]).to_dict()) == [1.0] * 30
    full = make_sft_transcripts(10, seed=0, tiny=False)
    assert format_answer_type_reward(completions=full["completion"], ground_truth=full["ground_truth"], ability=full["ability"]) == [1.0] * 10
