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


# ---------------------------------------------------------------------------------------------------- chains


def _left_to_right(question: str) -> int:
    tokens = question.rstrip(" =").split()
    value = int(tokens[0])
    for t in tokens[1:]:
        x = int(t[1:])
        value = {"*": value * x, "+": value + x, "-": value - x}[t[0]]
    return value


def test_chain_tasks_are_dependent_calls_that_compute_the_left_to_right_value():
    from trl_appo.tasks import chain_tasks

    for task in chain_tasks(200, "train", seed=3, lengths=(6,)):
        assert len(task.steps) == 6 and task.question.count(" ") == 7
        previous = None
        for code, output in task.steps:
            m = re.fullmatch(r"r=(\d+)([*+-])(\d+)\nprint\(r\)", code)
            assert m, code
            if previous is not None:
                assert m.group(1) == previous  # each call copies the previous call's output
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert output == str({"*": a * b, "+": a + b, "-": a - b}[op])
            previous = output
        assert task.answer == previous == str(_left_to_right(task.question))
        assert int(task.answer) > 0


def test_chain_tasks_deterministic_disjoint_and_mixed_lengths():
    from trl_appo.tasks import chain_tasks, make_chain_tasks

    train = chain_tasks(300, "train", seed=0, lengths=(2, 6))
    assert [t.question for t in train] == [t.question for t in chain_tasks(300, "train", seed=0, lengths=(2, 6))]
    held = chain_tasks(200, "heldout", seed=0, lengths=(2, 6))
    assert not {t.question for t in train} & {t.question for t in held}
    assert {len(t.steps) for t in train} == {2, 6}
    assert all(split_of(t.question) == "heldout" for t in held)
    ds = make_chain_tasks(10, 5, seed=0, lengths=(3,))
    assert len(ds["train"]) == 10 and len(ds["heldout"]) == 5
    assert ds["heldout"]["ground_truth"] == [t.answer for t in chain_tasks(5, "heldout", seed=0, lengths=(3,))]
    with pytest.raises(ValueError, match="chain lengths"):
        chain_tasks(3, lengths=(0,))


def test_chain_ideal_transcript_is_well_formed_and_scores_one():
    from trl_appo.tasks import chain_sft_transcripts, chain_tasks, ideal_completion

    task = chain_tasks(1, "train", seed=0, lengths=(3,))[0]
    text = ideal_completion(task)
    assert text.count("<python>") == 3 and text.count(" <result>\n") == 3
    assert text.endswith(f"<answer>\\boxed{{{task.answer}}}</answer>")
    assert check_format(text)[0]
    assert answer_type_reward(completions=[text], ground_truth=[task.answer]) == [1.0]
    rows = chain_sft_transcripts(4, seed=0, lengths=(3,))
    assert rows[0]["completion"][0]["content"] == text


def _example(tok, completion: str):
    from trl_appo.sft import tag_transcript_example

    ex = tag_transcript_example(tok, "", completion)
    return ex.completion_ids, ex.loss_mask


@pytest.fixture(scope="module")
def tiny_tok():
    from trl_appo.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


GOLD = "<python>r=1234*56\nprint(r)</python> <result>\n69104\n</result><answer>\\boxed{69104}</answer>"


def test_first_wrong_token_on_hand_built_rollouts(tiny_tok):
    from trl_appo.tasks import first_wrong_token

    gold = GOLD + tiny_tok.eos_token
    ids, mask = _example(tiny_tok, GOLD)
    assert first_wrong_token(tiny_tok, ids, mask, gold) is None  # the gold itself
    assert first_wrong_token(tiny_tok, ids[:20], mask[:20], gold) is None  # cut off while still on the gold
    # tokens: <python> r = 1 2 3 4 * 5 6 ... -> the miscopied operand digit "5" (for "4") is token 6
    ids, mask = _example(tiny_tok, GOLD.replace("1234*56", "1235*56").replace("69104", "69160"))
    assert first_wrong_token(tiny_tok, ids, mask, gold) == 6
    # call right, answer miscopied: <python>..</python> is 16 tokens, the result block 10, then
    # <answer> \ boxed { 6 9 1 0 -> the wrong last digit is token 16 + 10 + 8 = 34
    ids, mask = _example(tiny_tok, GOLD.replace("{69104}", "{69105}"))
    assert first_wrong_token(tiny_tok, ids, mask, gold) == 34
    # stopping after the call (eos where the gold writes <answer>) makes eos the wrong token
    ids, mask = _example(tiny_tok, GOLD.split("<answer>")[0])
    assert first_wrong_token(tiny_tok, ids, mask, gold) == 26 and ids[26] == tiny_tok.eos_token_id


def test_first_wrong_token_rejects_a_gold_of_another_task(tiny_tok):
    from trl_appo.tasks import first_wrong_token

    ids, mask = _example(tiny_tok, GOLD)
    other = GOLD.replace("69104", "69105")  # same call, different tool output: not this task's transcript
    with pytest.raises(ValueError, match="tool token"):
        first_wrong_token(tiny_tok, ids, mask, other + tiny_tok.eos_token)
    with pytest.raises(ValueError, match="differ in length"):
        first_wrong_token(tiny_tok, ids, mask[:-1], GOLD)


def test_oracle_hints_point_at_the_first_wrong_token_and_the_oracle_criterion_branches_there(tiny_tok):
    import torch

    from trl_appo import core
    from trl_appo.tasks import chain_oracle_criterion, make_chain_tasks, oracle_hints

    right, right_mask = _example(tiny_tok, GOLD)
    wrong, wrong_mask = _example(tiny_tok, GOLD.replace("{69104}", "{69105}"))  # first wrong token: 34
    rows = [{"gold_completion": GOLD}, {"gold_completion": GOLD}, {}, {"gold_completion": GOLD.replace("69104", "1")}]
    ids, masks = [wrong, right, wrong, wrong], [wrong_mask, right_mask, wrong_mask, wrong_mask]

    def context(keep_token):
        return core.BranchContext(torch.zeros(4, len(wrong)), ids, masks, rows, tiny_tok, keep_token)

    # keep_token: keep the last right token (33) and re-decide 34; resample: re-decide 34 itself. The correct
    # root, the row without a gold and the row whose gold is another task's transcript get no hint.
    assert oracle_hints(context(True)) == [33, None, None, None]
    assert oracle_hints(context(False)) == [34, None, None, None]

    candidates = torch.ones(4, len(wrong), dtype=torch.bool)
    candidates[0, 33] = False  # not a candidate: the nearest ones (32, then 34) are taken
    tier, primary, _ = chain_oracle_criterion(None, None, candidates, torch.Generator().manual_seed(0),
                                              context=context(True))
    assert tier[:, 0].tolist() == [7, 8, 8, 8]
    assert primary[0, 32] == primary[0, 34] == -1 and primary[0, 33] == 0
    # The chain datasets carry the gold transcript the oracle reads.
    data = make_chain_tasks(2, 1, lengths=(2,))
    assert data["train"][0]["gold_completion"].count("<python>") == 2
