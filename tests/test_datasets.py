"""Loaders: the real ARPO parquet release, local GSM8K / MATH / HotpotQA-style files, and the offline hub path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from trl_appo.datasets import (
    OUTPUT_COLUMNS,
    TAG_PROTOCOL_SYSTEM_PROMPT,
    detect_schema,
    fix_release_escapes,
    gsm8k_final_answer,
    load_arpo_dataset,
    load_dataset_any,
    math_final_answer,
)
from trl_appo.rewards import format_f1_reward, math_equivalence_reward

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arpo"


def _data(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent")
    return path


# ---------------------------------------------------------------------------------------------- ARPO parquet


def test_valid_parquet_schema_and_rows():
    ds = load_arpo_dataset(_data("valid.parquet"))
    assert ds.column_names == list(OUTPUT_COLUMNS)
    assert len(ds) == 180
    assert ds["ability"].count("math") == 100 and ds["ability"].count("qa") == 80
    assert set(ds["data_source"]) == {"DR_grpo_mix"}
    first = ds[0]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert first["ground_truth"] == "Eleanor Of Lancaster"
    assert all(isinstance(g, str) and g for g in ds["ground_truth"])


def test_boxed_escape_is_fixed_by_default_and_kept_on_request():
    fixed = load_arpo_dataset(_data("valid.parquet"), limit=3)
    raw = load_arpo_dataset(_data("valid.parquet"), limit=3, fix_escapes=False)
    system_fixed, system_raw = fixed[0]["prompt"][0]["content"], raw[0]["prompt"][0]["content"]
    assert "\x08" not in system_fixed and system_fixed.count("\\boxed{") == 2
    assert system_raw.count("\x08oxed") == 2
    assert fix_release_escapes(system_raw) == system_fixed
    assert fix_release_escapes("in the form \x0crac{m}{n}") == "in the form \\frac{m}{n}"


def test_directory_split_picks_file_and_ability_stays_a_string_column():
    ds = load_arpo_dataset(_data("valid.parquet").parent, split="hle_test", limit=10)
    assert len(ds) == 10
    assert ds.features["ability"].dtype == "string" and set(ds["ability"]) == {None}
    assert ds[0]["ground_truth"] == "D"


def test_split_filters_rows_of_a_file(tmp_path):
    frame = pd.read_parquet(_data("valid.parquet")).head(4)
    other = frame.copy()
    other["extra_info"] = [{**info, "split": "train"} for info in other["extra_info"]]
    path = tmp_path / "mixed.parquet"
    pd.concat([frame, other]).to_parquet(path)
    assert len(load_arpo_dataset(path, split="valid")) == 4
    assert len(load_arpo_dataset([path, _data("valid.parquet")], split="train")) == 4


def test_loaded_rows_feed_the_reward_functions():
    ds = load_arpo_dataset(_data("valid.parquet"), limit=12)
    completions = [f"<python>x</python> <result>\n1\n</result><answer>\\boxed{{{g}}}</answer>" for g in ds["ground_truth"]]
    assert format_f1_reward(prompts=ds["prompt"], completions=completions, **ds.to_dict()) == [1.0] * 12


def test_missing_columns_raise_a_clear_error(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "q"}]], "reward_model": [{"ground_truth": "a"}]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"\['data_source'\].*expected the ARPO/APPO schema"):
        load_arpo_dataset(path)
    no_gold = tmp_path / "no_gold.parquet"
    pd.DataFrame({"prompt": ["q"], "data_source": ["x"]}).to_parquet(no_gold)
    with pytest.raises(ValueError, match="reward_model"):
        load_arpo_dataset(no_gold)
    with pytest.raises(FileNotFoundError):
        load_arpo_dataset(tmp_path / "absent.parquet")


# ---------------------------------------------------------------------------------------------- adapters


GSM8K = [
    {"question": "Tom has 3 apples and buys 1,197 more. How many?", "answer": "3 + 1197 = 1200\n#### 1,200"},
    {"question": "What is 6 * 7?", "answer": "6*7=42\n#### 42"},
]
MATH = [
    {"problem": "Compute $\\frac{1}{2} + 0$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Find $x$.", "solution": "So $x = \\boxed{\\{1, 2\\}}$."},
]
HOTPOT = [
    {
        "question": "Which city hosts the tower?",
        "answer": "Paris",
        "context": {"title": ["Eiffel Tower"], "sentences": [["The tower ", "is in Paris."]]},
    }
]


def _write(tmp_path: Path, name: str, records: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    elif name.endswith(".csv"):
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["gsm.jsonl", "gsm.json", "gsm.csv", "gsm.parquet"])
def test_gsm8k_files_in_every_format(tmp_path, name):
    ds = load_dataset_any(_write(tmp_path, name, GSM8K))
    assert ds.column_names == list(OUTPUT_COLUMNS)
    assert ds["ground_truth"] == ["1200", "42"]
    assert ds["ability"] == ["math", "math"] and ds["data_source"] == ["gsm8k", "gsm8k"]
    assert ds[1]["prompt"] == [
        {"role": "system", "content": TAG_PROTOCOL_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 6 * 7?"},
    ]


def test_math_records_take_the_last_boxed_answer(tmp_path):
    ds = load_dataset_any(_write(tmp_path, "math.jsonl", MATH))
    assert ds["ground_truth"] == ["\\frac{1}{2}", "\\{1, 2\\}"]
    assert math_equivalence_reward(completions=["\\boxed{0.5}"], ground_truth=ds["ground_truth"][:1]) == [1.0]


def test_hotpotqa_context_is_optional(tmp_path):
    path = _write(tmp_path, "hotpot.json", HOTPOT)
    open_domain = load_dataset_any(path)
    with_context = load_dataset_any(path, include_context=True)
    assert open_domain[0]["prompt"][-1]["content"] == "Which city hosts the tower?"
    assert "Eiffel Tower: The tower is in Paris." in with_context[0]["prompt"][-1]["content"]
    assert open_domain["ability"] == ["qa"] and open_domain["ground_truth"] == ["Paris"]


def test_schema_override_and_custom_system_prompt(tmp_path):
    path = _write(tmp_path, "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    ds = load_dataset_any(path, schema="hotpotqa", system_prompt=None)
    assert ds[0]["prompt"] == [{"role": "user", "content": "2+2?"}]


def test_bad_records_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the schema.*gsm8k"):
        load_dataset_any(_write(tmp_path, "x.jsonl", [{"text": "hello"}]))
    with pytest.raises(ValueError, match="####"):
        load_dataset_any(_write(tmp_path, "g.jsonl", [{"question": "q", "answer": "no marker"}]), schema="gsm8k")
    with pytest.raises(ValueError, match="boxed"):
        math_final_answer("the answer is 3")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question', 'answer'\]"):
        load_dataset_any(_write(tmp_path, "m.jsonl", [{"problem": "p", "solution": "\\boxed{1}"}]), schema="gsm8k")
    with pytest.raises(FileNotFoundError):
        load_dataset_any(tmp_path / "missing.jsonl")
    assert detect_schema(["problem", "answer"]) == "math"
    assert gsm8k_final_answer("#### -3,000,000") == "-3000000"


def test_arpo_parquet_through_load_dataset_any():
    ds = load_dataset_any(_data("valid.parquet"), limit=5)
    assert ds.column_names == list(OUTPUT_COLUMNS) and len(ds) == 5
    assert len(load_dataset_any(_data("valid.parquet"), split="valid")) == 180


def test_hub_names_fail_fast_and_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="could not load 'openai/gsm8k' from the Hugging Face Hub"):
        load_dataset_any("openai/gsm8k", split="test")
